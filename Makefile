# The README's commands. Everything installs into the Python you run ($(PYTHON); use a venv for
# isolation). A torch that is already importable (e.g. your CUDA build) is kept and pinned to
# itself; only when none is installed do we install the CPU-tested pin below.
PYTHON ?= python3
TORCH_PIN := torch==2.13.0
SETUP_STAMP := build/.setup-$(shell $(PYTHON) -c 'import sys; print("%d%d" % sys.version_info[:2])' 2>/dev/null)
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh)

.PHONY: setup demo test bench build-ext backends

$(SETUP_STAMP): $(SOURCES)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_PIN)
	$(PYTHON) -m pip install --upgrade "setuptools>=64" wheel
	$(PYTHON) -m pip install --no-build-isolation -e ".[test,demo]" \
		"torch==$$($(PYTHON) -c 'import torch; print(torch.__version__)')"
	$(PYTHON) setup.py -q build_ext --inplace
	@mkdir -p build && touch $@

setup: $(SETUP_STAMP)  ## install fastdiff (editable) with the C++ extension built in place
	@$(PYTHON) -c "import fastdiff; fastdiff.backends()"

demo: setup  ## the main job: train a small model on 8x8 digits, sample, write pictures + timings
	$(PYTHON) -m fastdiff.demo $(ARGS)

test: setup  ## the test suite (CPU: Triton kernels run under the interpreter)
	$(PYTHON) -m pytest -q $(ARGS)

bench: setup  ## pytest-benchmark suites; ARGS="--quick" for a short CPU run
	$(PYTHON) -m pytest benchmarks/ --benchmark-only $(ARGS)

build-ext:  ## rebuild the C++/CUDA extension in place (offline, torch already installed)
	$(PYTHON) setup.py build_ext --inplace
