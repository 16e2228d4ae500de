# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv at the repository root
# on first use and install the project (editable, with test extras) into it; later runs reuse it.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moezoo-installed
# The tested torch set; pip on this machine kind takes these wheels from the local disk.
TORCH  := torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0

.PHONY: demo test test-avx2 venv bench clean-venv browser

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

test: $(STAMP) browser
	$(PY) -m pytest -q tests

# The numerics tests on the AVX2 kernels (Zen 3 machines have no AVX-512): oneDNN and ATen capped at AVX2.
test-avx2: $(STAMP)
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MOEZOO_KERNEL_MARCH=x86-64-v3 $(PY) -m pytest -q tests/kernels tests/zoo tests/pipelines

demo: $(STAMP)
	$(PY) -m moezoo.app

bench: $(STAMP)
	$(PY) bench/moe_layer.py

# Debian's Chromium for the end-to-end test tests/app/test_browser.py. Playwright (a test extra) is only the
# Python driver: the test runs /usr/bin/chromium, never `playwright install` (no browser downloads here).
# Best effort: without root or a Debian mirror the browser test skips and says why.
browser:
	@test -x /usr/bin/chromium || apt-get install -y -q chromium >/dev/null \
		|| (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) \
		|| echo "chromium could not be installed: tests/app/test_browser.py will skip"

clean-venv:
	rm -rf $(VENV)
