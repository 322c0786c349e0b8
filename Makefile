# The README's two commands: `make demo` (main job) and `make test` (the tests; .ci/run calls it).
# `make bench` regenerates every published figure, stamped (on a quiet machine; about 85 minutes on 2
# cores, BENCH_ARGS="--skip accuracy" for the performance figures alone, about 61).
.PHONY: demo test setup bench

demo:
	bash scripts/setup.sh
	.venv/bin/ctscreen demo

test:
	bash scripts/setup.sh --test
	bash scripts/test.sh

setup:
	bash scripts/setup.sh --test

bench:
	bash scripts/setup.sh --test
	-bash scripts/setup_monai_peer.sh  # the MONAI Deploy SDK peer; without it its figure says why
	.venv/bin/python -m benchmarks figures $(BENCH_ARGS)
