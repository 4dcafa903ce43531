"""The multi-tensor launch plan of the CUDA kernels (csrc/cuda/multi_tensor.cuh), run on the host:
a persistent grid over tables of up to 32 tensors, where block b steps chunks b, b + blocks, ...

tests/csrc/multi_tensor_plan.cpp drives the header's own host code (for_each_table,
launch_blocks, ChunkWork) and plays the kernels' chunk loop; these tests check that every element
of every tensor is stepped exactly once, in 64K-element chunks that start on chunk boundaries,
with one launch per 32 tensors and at most `max_blocks` blocks, each with its fair share.  Needs a
host C++ compiler and the CUDA runtime headers (the header includes them); no GPU.
"""
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from tests.csrc.test_nvcc_compile import NVCC

CHUNK = 65536
MAX_TENSORS = 32
DRIVER = Path(__file__).with_name("multi_tensor_plan.cpp")
CXX = shutil.which("c++") or shutil.which("g++")
CUDA_INCLUDE = Path(NVCC).resolve().parents[1] / "include" if NVCC else None

pytestmark = pytest.mark.skipif(
    CXX is None or CUDA_INCLUDE is None or not (CUDA_INCLUDE / "cuda_runtime.h").is_file(),
    reason="needs a host C++ compiler and the CUDA runtime headers (a CUDA toolkit; no GPU)")


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    exe = tmp_path_factory.mktemp("plan") / "multi_tensor_plan"
    include = DRIVER.parents[2] / "csrc" / "include"
    subprocess.run([CXX, "-std=c++17", "-O1", "-I", str(include), "-I", str(CUDA_INCLUDE), str(DRIVER), "-o",
                    str(exe)], check=True, capture_output=True, text=True, timeout=300)

    def run(max_blocks, numels):
        out = subprocess.run([str(exe), str(max_blocks), *map(str, numels)], check=True, capture_output=True,
                             text=True, timeout=300).stdout.split("\n")
        launches, chunks = [], []
        for line in filter(None, out):
            kind, *values = line.split()
            if kind == "launch":
                launches.append(dict(zip(("launch", "slots", "blocks"), map(int, values[::2]))))
            else:
                chunks.append(tuple(map(int, values)))  # launch, tensor, block, start, n
        return launches, chunks

    return run


def check_plan(launches, chunks, max_blocks, numels):
    """Exact cover of every tensor, tables of <= 32 tensors in list order, fair block shares."""
    filled = [i for i, n in enumerate(numels) if n]
    assert len(launches) == -(-len(filled) // MAX_TENSORS)
    assert sum(launch["slots"] for launch in launches) == len(filled)
    ranges = defaultdict(list)
    per_block = defaultdict(int)
    tables = defaultdict(set)
    for launch, tensor, block, start, n in chunks:
        ranges[tensor].append((start, n))
        per_block[launch, block] += 1
        tables[launch].add(tensor)
    assert sorted(ranges) == filled
    for tensor, spans in ranges.items():
        spans.sort()
        assert all(start % CHUNK == 0 and 0 < n <= CHUNK for start, n in spans), tensor
        ends = [0] + [start + n for start, n in spans]
        assert [start for start, _ in spans] == ends[:-1] and ends[-1] == numels[tensor], tensor
    order = [sorted(tables[launch]) for launch in range(len(launches))]
    assert [t for table in order for t in table] == filled  # list order, one table after another
    for launch in launches:
        table_chunks = sum(-(-numels[t] // CHUNK) for t in tables[launch["launch"]])
        assert launch["blocks"] == min(table_chunks, max_blocks)
        shares = [per_block[launch["launch"], b] for b in range(launch["blocks"])]
        assert max(shares) - min(shares) <= 1 and min(shares) >= 1


ODD = [0, 1, 3, 5, 65535, 65536, 65537, 320 * 65536 + 5, 0, 7]


@pytest.mark.parametrize("max_blocks", [1, 7, 264, 10**6])
def test_odd_sizes_are_stepped_exactly_once(plan, max_blocks):
    launches, chunks = plan(max_blocks, ODD)
    check_plan(launches, chunks, max_blocks, ODD)


def test_a_list_of_40_tensors_takes_two_launches(plan):
    numels = [1000 + 4099 * i for i in range(40)]
    launches, chunks = plan(264, numels)
    assert [launch["slots"] for launch in launches] == [32, 8]
    check_plan(launches, chunks, 264, numels)


def test_a_tensor_past_2_31_elements_is_covered_in_int64(plan):
    numels = [5, 2**31 + 5, 3]
    launches, chunks = plan(264, numels)
    check_plan(launches, chunks, 264, numels)
    assert max(start for _, tensor, _, start, _ in chunks if tensor == 1) == 2**31


@pytest.mark.parametrize("numels", [[], [0, 0]], ids=["empty", "only-empty"])
def test_nothing_to_step_launches_nothing(plan, numels):
    assert plan(264, numels) == ([], [])
