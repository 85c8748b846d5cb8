"""beta, the big frozen model that reasons: I_beta prompts, backends, the rationale store, `fiat serve`."""
