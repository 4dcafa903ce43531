"""The last-level cache's size, from a fake sysfs tree, lscpu's text and getconf, and the stated
default when none answers."""
import pytest

from childopt.bench import llc


def fake_cache(root, cpu, index, level, kind, size, shared):
    """Write ``root/cpu<cpu>/cache/index<index>/{level,type,size,shared_cpu_list}`` as Linux does."""
    directory = root / f"cpu{cpu}" / "cache" / f"index{index}"
    directory.mkdir(parents=True)
    for name, text in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
        (directory / name).write_text(f"{text}\n")


def fake_machine(root, l3_shared):
    """Two CPUs with private L1d, L1i and L2 and an L3 of 105 MiB per instance, shared as ``l3_shared`` says."""
    for cpu in (0, 1):
        fake_cache(root, cpu, 0, 1, "Data", "48K", cpu)
        fake_cache(root, cpu, 1, 1, "Instruction", "32K", cpu)
        fake_cache(root, cpu, 2, 2, "Unified", "2048K", cpu)
        fake_cache(root, cpu, 3, 3, "Unified", "107520K", l3_shared[cpu])


@pytest.mark.parametrize("text,size", [("107520K", 107520 * 1024), ("105 MiB (1 instance)", 105 * 2**20),
                                       ("110100480", 110100480), ("32 MB", 32 * 2**20), ("1.5 GiB", 3 * 2**29),
                                       ("", None), ("0", None), ("unknown", None)])
def test_parse_size_reads_what_sysfs_lscpu_and_getconf_write(text, size):
    assert llc.parse_size(text) == size


def test_sysfs_gives_the_highest_data_or_unified_level_once_per_shared_instance(tmp_path):
    fake_machine(tmp_path, l3_shared=("0-1", "0-1"))
    found = llc.from_sysfs(tmp_path)
    assert found.bytes == found.instance_bytes == 107520 * 1024 and found.known
    assert "L3, 1 x" in found.source and str(tmp_path) in found.source


def test_sysfs_adds_up_distinct_instances(tmp_path):
    """Two L3 instances: the total is both, what one core's data can stay in is one."""
    fake_machine(tmp_path, l3_shared=("0", "1"))
    found = llc.from_sysfs(tmp_path)
    assert (found.bytes, found.instance_bytes) == (2 * 107520 * 1024, 107520 * 1024)


def test_sysfs_skips_instruction_caches_and_unreadable_entries(tmp_path):
    fake_cache(tmp_path, 0, 0, 1, "Data", "48K", 0)
    fake_cache(tmp_path, 0, 1, 2, "Instruction", "64K", 0)
    (tmp_path / "cpu0" / "cache" / "index2").mkdir()  # no files: skipped
    assert llc.from_sysfs(tmp_path).bytes == 48 * 1024
    assert llc.from_sysfs(tmp_path / "nothing-here") is None


def test_lscpu_text_gives_its_highest_level():
    text = ("L1d cache:                               96 KiB (2 instances)\n"
            "L1i cache:                               64 KiB (2 instances)\n"
            "L2 cache:                                4 MiB (2 instances)\n"
            "L3 cache:                                105 MiB (1 instance)\n")
    assert llc.from_lscpu_text(text) == llc.CacheSize(105 * 2**20, "lscpu: L3", instance_bytes=105 * 2**20)
    assert llc.from_lscpu_text("Architecture: x86_64\n") is None


@pytest.mark.parametrize("line,total,instance", [("L3 cache: 256 MiB (8 instances)", 2**28, 2**25),
                                                 ("L3 cache: 32768K", 2**25, 2**25)])
def test_lscpu_splits_its_total_over_the_instances_it_names(line, total, instance):
    """util-linux >= 2.34 prints the total and the instance count; older lscpu one instance's size."""
    found = llc.from_lscpu_text(line + "\n")
    assert (found.bytes, found.instance_bytes) == (total, instance)


def test_cpu_llc_falls_back_from_sysfs_to_lscpu_to_getconf_to_the_default(tmp_path, monkeypatch):
    answers = {"lscpu": "L2 cache: 1 MiB\n", "getconf": "8388608\n"}
    monkeypatch.setattr(llc, "_command", lambda argv: answers.get(argv[0]))
    assert llc.cpu_llc(tmp_path) == llc.CacheSize(2**20, "lscpu: L2", instance_bytes=2**20)  # no sysfs entries
    answers["lscpu"] = None
    assert llc.cpu_llc(tmp_path) == llc.CacheSize(8 * 2**20, "getconf LEVEL3_CACHE_SIZE", instance_bytes=8 * 2**20)
    answers["getconf"] = "0\n"
    unknown = llc.cpu_llc(tmp_path)
    assert unknown.bytes == llc.DEFAULT_BYTES and not unknown.known and unknown.instance_bytes is None
    assert unknown.source.startswith("unknown") and "256 MiB" in unknown.source
    fake_machine(tmp_path, l3_shared=("0-1", "0-1"))
    assert llc.cpu_llc(tmp_path, cpus={0, 1}).bytes == 107520 * 1024  # sysfs first


def test_only_the_instances_of_the_cpus_this_process_may_run_on_count(tmp_path, monkeypatch):
    """Two L3 instances, one per CPU: a process that may run on CPU 1 only reaches one of them."""
    fake_machine(tmp_path, l3_shared=("0", "1"))
    assert llc.from_sysfs(tmp_path, cpus={0, 1}).bytes == 2 * 107520 * 1024
    one = llc.from_sysfs(tmp_path, cpus={1})
    assert (one.bytes, one.instance_bytes) == (107520 * 1024, 107520 * 1024)
    assert "1 x" in one.source and "of the 1 CPU this process may run on" in one.source
    assert llc.from_sysfs(tmp_path, cpus={7}) is None  # none of its CPUs listed: the next source answers
    monkeypatch.setattr(llc.os, "sched_getaffinity", lambda pid: {1}, raising=False)
    assert llc.cpu_llc(tmp_path).bytes == 107520 * 1024  # by default, the process's affinity


def test_without_an_affinity_every_listed_cpu_counts(tmp_path, monkeypatch):
    fake_machine(tmp_path, l3_shared=("0", "1"))
    monkeypatch.delattr(llc.os, "sched_getaffinity", raising=False)
    assert llc.allowed_cpus() is None
    assert llc.cpu_llc(tmp_path).bytes == 2 * 107520 * 1024


@pytest.mark.skipif(not (llc.SYSFS_CPU / "cpu0" / "cache").is_dir(), reason="no sysfs cache information here")
def test_this_machine_s_cache_is_read_from_sysfs():
    found = llc.cpu_llc()
    assert found.known and found.source.startswith("sysfs") and found.bytes >= 2**20, found


@pytest.mark.parametrize("text", ["1.2.3K", "9" * 400 + "K", "\u0661\u0662K"])
def test_parse_size_takes_malformed_or_absurd_numbers_as_no_size(text):
    """A corrupt sysfs, lscpu or getconf value falls back to the default, never raises."""
    assert llc.parse_size(text) is None
