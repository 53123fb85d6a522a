# The two commands of the README: `make demo` (set up + train + evaluate the embedded demo)
# and `make test` (set up + run the test suite; what CI runs).
PYTHON ?= python
TORCH ?= torch==2.13.0

.PHONY: install setup demo test bench-gpu bench-gpu-more

install:
	$(PYTHON) -m pip install --quiet $(TORCH) -r requirements-test.txt

setup: install
	$(PYTHON) tools/prepare.py setup

test: setup
	$(PYTHON) -m pytest -q --durations=15 tests

data/demo/train.jsonl: tools/demo.py
	$(PYTHON) tools/prepare.py make-demo --out data/demo

demo: setup data/demo/train.jsonl
	$(PYTHON) train.py --config configs/demo.py --workdir runs/demo
	$(PYTHON) evaluate.py --ckpt runs/demo/checkpoints/last.pt --prompts prompt6
	@echo "TensorBoard: tensorboard --logdir runs"

# One accelerator, at most 8 minutes: the figures that decide the open speed questions, most wanted
# first, each under its own time limit (a command past it is cut and the next one runs). Needs data/
# from `python tools/prepare.py setup`. JSON goes to $(OUT). `make bench-gpu-more` runs the rest
# of BENCHMARKS.md's GPU figures (parts, precision, loaders, larger batches; about 10 more minutes).
OUT ?= bench_out/gpu
IMAGES ?= ../shared/bench_images
BENCH = $(PYTHON) tools/bench.py
STEP = $(BENCH) step --batch=256 --warmup=3 --steps=12
LIMIT = timeout --kill-after=10
bench-gpu:
	mkdir -p $(OUT)
	-$(LIMIT) 170 $(BENCH) scopes --config=configs/vitb32.py --batch=256 --scopes=false,model,step \
		--out=$(OUT)/scopes_vitb32_256.json
	-$(LIMIT) 170 $(STEP) --config=configs/r50.py --compile --set="runtime.compile='step'" --out=$(OUT)/step_r50_256.json
	-$(LIMIT) 40 $(BENCH) saved --config=configs/vitb32.py --batch=256 --out=$(OUT)/saved_vitb32_256.json
	-$(LIMIT) 60 $(BENCH) memory --config=configs/vitb32.py --batch=256 --accum=4 --out=$(OUT)/memory_vitb32.json

bench-gpu-more:
	mkdir -p $(OUT)
	test -f data/demo/train.jsonl || $(PYTHON) tools/prepare.py make-demo --out data/demo
	$(BENCH) scopes --config=configs/r50.py --batch=256 --scopes=false,towers,model --out=$(OUT)/scopes_r50_256.json
	$(BENCH) saved --config=configs/r50.py --batch=256 --out=$(OUT)/saved_r50_256.json
	$(BENCH) memory --config=configs/r50.py --batch=256 --accum=4 --out=$(OUT)/memory_r50.json
	$(BENCH) step --config=configs/vitb32.py --batch=256 --compile --set="runtime.compile='step'" \
		--out=$(OUT)/step_vitb32_256.json
	$(PYTHON) train.py --config configs/vitb32.py:gpu_smoke --workdir $(OUT)/gpu_smoke
	$(BENCH) parts --config=configs/vitb32.py --batch=256 --out=$(OUT)/parts_vitb32.json
	$(BENCH) parts --config=configs/r50.py --batch=256 --out=$(OUT)/parts_r50.json
	$(BENCH) precision --config=configs/vitb32.py --batch=128 --out=$(OUT)/precision_vitb32.json
	$(BENCH) e2e --images=$(IMAGES) --workers=16 --batch=256 --steps=30 --step_ms=71 --out=$(OUT)/e2e_host.json
	$(BENCH) e2e --images=$(IMAGES) --workers=16 --batch=256 --steps=30 --step_ms=71 --decode=device \
		--out=$(OUT)/e2e_device.json
	$(BENCH) step --config=configs/vitb32.py --batch=256 --compile --decode=device --images=$(IMAGES) \
		--out=$(OUT)/step_vitb32_256_nvjpeg.json
	for b in 512 768 1024; do $(BENCH) step --config=configs/vitb32.py --batch=$$b --compile \
		--out=$(OUT)/step_vitb32_$$b.json || break; done
	for b in 384 512; do $(BENCH) step --config=configs/r50.py --batch=$$b --compile \
		--out=$(OUT)/step_r50_$$b.json || break; done
