# Every target sets up what it needs: a fresh Debian machine runs `make demo` or
# `make test` and nothing else. A second run is quick: the venv is rebuilt only
# when pyproject.toml changes, fonts are installed only when none covers Chinese.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TORCH  := torch==2.13.0
DEMO   := outputs/demo
PYTEST_ARGS ?=

.PHONY: setup fonts demo demo-sources test test-fast bench clean-demo

setup: $(STAMP) fonts

# torch first (the CPU build on this machine's disk), then deepspeed without build
# isolation (its setup.py imports torch; an isolated build would fetch a CUDA torch),
# then the project itself, editable.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH)
	$(PIP) install -q --no-build-isolation "deepspeed>=0.19,<0.20"
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

# fonts-noto-cjk covers Simplified and Traditional Chinese, Japanese and Korean; curl reads
# http(s) data sources (data_pipelines/core/remote.py) and the remote-source tests.
fonts:
	@if command -v fc-list >/dev/null && [ -n "$$(fc-list :lang=zh-cn family)" ] && command -v curl >/dev/null; then :; else \
		echo "no CJK font or no curl found: installing fonts-noto-cjk and curl"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends fontconfig fonts-noto-cjk fonts-dejavu-core curl ca-certificates && \
		fc-cache -f >/dev/null; \
	fi

# The embedded default, end to end, under outputs/demo/: the learnable tiny world
# (docs/model.md). The glyph data with its contact sheets, precomputed through the glyph
# world's checkpoint (its VAE fitted on first use, about 3 min, then cached under
# outputs/models/), the world trained through the three curriculum stages and the three
# tasks (a fresh run each time, OCR-scored at step 0 and every stage end), exported to a
# diffusers folder, scored by qwenimg-eval on the glyph suites, sampled through
# diffusers' pipelines, summary.json, and the run report (OCR curve, plots, summary.md).
GLYPH_MODEL := outputs/models/glyphs

demo: setup
	$(VENV)/bin/qwenimg-data --config-name glyphs out_dir=$(DEMO)/data/glyphs
	for source in synthetic edit; do \
		$(VENV)/bin/qwenimg-data --config-name preview shards=$(DEMO)/data/glyphs/$$source \
			out=$(DEMO)/preview/glyphs_$$source.png num_samples=24 || exit 1; \
		$(VENV)/bin/qwenimg-data --config-name precompute in_dir=$(DEMO)/data/glyphs/$$source \
			out_dir=$(DEMO)/data/glyphs-pre/$$source pretrained_path=$(GLYPH_MODEL) build_tiny=true \
			tiny_world=glyphs max_sequence_length=64 'resolutions=[64]' batch_size=32 || exit 1; \
	done
	rm -rf $(DEMO)/train $(DEMO)/export $(DEMO)/eval $(DEMO)/samples $(DEMO)/report
	$(VENV)/bin/qwenimg-train experiment=glyphs paths.output_dir=$(DEMO)/train
	$(VENV)/bin/qwenimg-export checkpoint=$(DEMO)/train/checkpoints/last.ckpt out_dir=$(DEMO)/export
	$(VENV)/bin/qwenimg-eval checkpoint_dir=$(DEMO)/export out_dir=$(DEMO)/eval suites=glyph limit=16 \
		resolution=64 steps=20 guidance=1.0 edit_source_area=4096
	$(PY) -m qwenimg_train.tools.demo --root $(DEMO)
	$(VENV)/bin/qwenimg-report run_dir=$(DEMO)/train out_dir=$(DEMO)/report \
		eval_json=$(DEMO)/eval/ocr.json samples_dir=$(DEMO)/samples
	@echo "demo outputs under $(DEMO)/ (summary: $(DEMO)/summary.json, report: $(DEMO)/report/summary.md)"

# A small set of every production source (synthetic renders, design, natural, edit
# pairs) with its contact sheet, under outputs/demo/data and outputs/demo/preview.
demo-sources: setup
	$(VENV)/bin/qwenimg-data --config-name synthetic out_dir=$(DEMO)/data/synthetic \
		num_shards=4 samples_per_shard=32 workers=2 ocr=crops
	$(VENV)/bin/qwenimg-data --config-name design out_dir=$(DEMO)/data/design \
		num_shards=2 samples_per_shard=24 workers=2 ocr=crops
	$(VENV)/bin/qwenimg-data --config-name natural out_dir=$(DEMO)/data/natural \
		num_shards=2 samples_per_shard=16
	$(VENV)/bin/qwenimg-data --config-name edit-pairs out_dir=$(DEMO)/data/edit \
		num_shards=2 samples_per_shard=24 workers=2
	for source in synthetic design natural edit; do \
		$(VENV)/bin/qwenimg-data --config-name preview shards=$(DEMO)/data/$$source \
			out=$(DEMO)/preview/$$source.png num_samples=24 || exit 1; \
	done

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_render.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/bench_zero.py
	$(PY) benchmarks/bench_precompute.py
	$(PY) benchmarks/bench_plan.py
	$(PY) benchmarks/bench_lora_memory.py
	$(PY) benchmarks/bench_ddp.py

clean-demo:
	rm -rf $(DEMO)
