# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv at the repository root
# on first use and install the project (editable, with test extras) into it; later runs reuse it.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moezoo-installed
# The tested torch set; pip on this machine kind takes these wheels from the local disk.
TORCH  := torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0

.PHONY: demo test venv bench clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m moezoo.app

bench: $(STAMP)
	$(PY) bench/moe_layer.py

clean-venv:
	rm -rf $(VENV)
