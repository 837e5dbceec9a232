# asyndgan — every target installs what it needs first (via `setup`).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The CPU build of torch lies on this machine's disk; any other version downloads a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=


.PHONY: system-deps setup protos check-protos check-proto-compat demo train-local test test-fast lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

protos: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PYTHON=$(PY) bash scripts/gen_protos.sh

# Fails if the committed stubs differ from what `make protos` builds (also a test: tests/unit/test_protos.py).
check-protos: setup
	$(PY) -m pytest -q tests/unit/test_protos.py

demo: setup
	$(PY) -m asyndgan.cli demo --out runs/demo

train-local: setup
	$(PY) -m asyndgan.cli train-local --sites 3 --out runs/local

system-deps:
	bash scripts/system_deps.sh

test: setup system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not e2e" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy asyndgan services clients
	cd protos && ../$(VENV)/bin/buf lint

# The wire contract stays compatible with the previous commit (buf's FILE rules); CI runs it.
check-proto-compat: setup
	@if git rev-parse -q --verify HEAD~1 >/dev/null; then \
		cd protos && ../$(VENV)/bin/buf breaking --against '../.git#ref=HEAD~1,subdir=protos'; \
	else echo "check-proto-compat: no previous commit here (shallow clone?): skipped"; fi

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) -m asyndgan.experiments.bench --out results/bench.json

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

.PHONY: helm-lint docker-smoke

# Static checks of the Helm chart and the Dockerfile (installs helm, kubernetes-validate, hadolint into .tools/).
helm-lint: setup
	PY=$(PY) bash scripts/helm_lint.sh

# Builds both images on a private Docker daemon and trains a few steps with them (root; ~6 min from scratch).
docker-smoke: setup
	VENV=$(VENV) bash scripts/docker_smoke.sh

# Segmentation evaluation (easy + hard settings, memorisation audit) -> results/eval.{json,md,png}; docs/evaluation.md
.PHONY: eval eval-privacy
eval: setup
	$(PY) -m asyndgan.cli eval --out results

# Wire codecs vs segmentation quality (easy setting per codec pair) -> results/codecs.{json,md}
.PHONY: eval-codecs
eval-codecs: setup
	$(PY) -m asyndgan.experiments.codec_eval --out results

# Modality completion: one site without t2, its segmenter with AsynDGAN's synthetic t2 -> results/completion.{json,md}
.PHONY: eval-completion
eval-completion: setup
	$(PY) -m asyndgan.experiments.completion --out results

# Privacy evaluation (guard vs none: attacks, membership, memorisation, utility, step time) -> results/privacy.{json,md}
eval-privacy: setup
	$(PY) -m asyndgan.experiments.privacy_eval --out results
