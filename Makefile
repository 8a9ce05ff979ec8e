# The README's commands. Everything installs into the Python you run ($(PYTHON); use a venv for
# isolation). A torch that is already importable (e.g. your CUDA build) is kept and pinned to
# itself; only when none is installed do we install the CPU-tested pin below.
PYTHON ?= python3
TORCH_PIN := torch==2.13.0
SETUP_STAMP := build/.setup-$(shell $(PYTHON) -c 'import sys; print("%d%d" % sys.version_info[:2])' 2>/dev/null)
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh)

.PHONY: setup demo test bench build-ext backends gpu-check gpu-results

$(SETUP_STAMP): $(SOURCES)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_PIN)
	$(PYTHON) -m pip install --upgrade "setuptools>=64" wheel
	$(PYTHON) -m pip install --no-build-isolation -e ".[test,demo]" \
		"torch==$$($(PYTHON) -c 'import torch; print(torch.__version__)')"
	# k-diffusion: a second oracle for DPM-Solver++ (tests load its sampling.py by path). Without its
	# declared dependencies, which pull torchvision, wandb, clip... (not in the test extra for that reason)
	$(PYTHON) -m pip install --no-deps "k-diffusion==0.1.1.post1"
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

# On an NVIDIA GPU machine with torch + triton preinstalled (no network, no `make setup`): build the
# extension with CUDA, run the cuda tests, the GPU benchmarks, the e2e loops and a profile, write
# benchmarks/results/ + BENCHMARKS.md's GPU section (and copies in $(OUT) when set), < 9 minutes.
# Without a GPU: one line, exit status 2. Wheels in .whl/ (e.g. diffusers) are installed offline first.
gpu-check:  ## every GPU check in one command (see benchmarks/gpu_check.py); OUT=dir for copies of the results
	PYTHONUNBUFFERED=1 $(PYTHON) benchmarks/gpu_check.py $(if $(OUT),--out $(OUT)) $(ARGS)

gpu-results:  ## after a device run: DIR=<its files> -> benchmarks/results/ and BENCHMARKS.md's GPU section
	$(PYTHON) benchmarks/gpu_check.py --import $(DIR)
