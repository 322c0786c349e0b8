# The README's two commands: `make demo` (main job) and `make test` (the tests; .ci/run calls it).
.PHONY: demo test setup

demo:
	bash scripts/setup.sh
	.venv/bin/ctscreen demo

test:
	bash scripts/setup.sh --test
	bash scripts/test.sh

setup:
	bash scripts/setup.sh --test
