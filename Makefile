# The two setup commands the README starts with.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: demo test

.venv/.installed: setup.py
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

.venv/.installed-test: .venv/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

demo: .venv/.installed
	$(PY) -m fiat_jax.demo

test: .venv/.installed-test
	$(PY) -m pytest -q -n 2 --dist loadfile tests  # two workers, one test file each at a time
