# The two entry points (see README.md). Both create/reuse .venv and install what they need.
.PHONY: study test

study:
	bash scripts/study.sh

test:
	bash scripts/test.sh
