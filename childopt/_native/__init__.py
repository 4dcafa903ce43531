"""Finding, building and loading the native extension childopt._C (docs/design.md, "Building and loading childopt._C").

Order, once per process (the result, module or error, is cached: ``TORCH_LIBRARY(childopt)``
can be registered only once per process):

1. **Prebuilt** ``childopt._C`` (``CHILDOPT_BUILD_EXT=1`` at install): imported only if its
   ``_build_info.json`` matches the running torch (version and git version), torch's CUDA, the
   C++ ABI, Python, the platform and the installed sources, and its arch list covers every
   visible GPU (a cubin for the GPU's major version at or below its minor, or PTX at or below
   it).  Otherwise one warning says what mismatched and the JIT path takes over: never a
   crash, never a kernel built for another target.
2. **Cache**: ``<root>/childopt_C-<key16>/`` published with a ``manifest.json`` for exactly
   this key (or, for CUDA builds, a build of the same key for more archs) is imported without
   taking any lock, once its library matches the size and sha256 the manifest records.  A
   build that fails that check, has a corrupt manifest or does not load is never loaded: it is
   renamed to ``<root>/.bad-childopt_C-<key16>-*`` (so no process tries it again), one warning
   says why, and it is built again (``backend="auto"`` takes another backend instead).
3. **JIT build**: under ``fcntl.flock`` on ``<root>/locks/childopt_C-<key16>.lock`` (a file
   never deleted), waited on with ``CHILDOPT_LOCK_TIMEOUT`` and a progress line naming the
   holder; after the timeout the process builds anyway.  The build runs in a child process
   (``torch.utils.cpp_extension.load`` and ninja) inside ``<root>/.tmp-<key16>-<host>-<pid>-*``
   and is published by ``os.rename`` after the library is fsynced and the manifest, with its
   checksum, is written and fsynced; losing the rename race means using the winner's build.

A relative CHILDOPT_CACHE_DIR or XDG_CACHE_HOME is made absolute at its first use.  The key
hashes everything a build depends on (childopt._native.config.key_inputs), so a changed
source, flag, torch, CUDA, arch list, Python or platform gives a new directory and never
touches an old one; the C++ compiler's version is recorded in the manifest but kept out of the
key (config.RECORDED_ONLY), so a machine without a compiler still loads the cache.  Before any
library is mapped, its ELF headers are checked to lie inside the file (childopt._native.elf).
Correctness never depends on the lock: a builder killed at any point leaves a ``.tmp-*``
directory nobody reads and a lock the kernel has released.

Why the build runs in a child process: a compiler or ninja that hangs or is OOM-killed cannot
take the training process with it, the parent bounds the build with ``CHILDOPT_BUILD_TIMEOUT``
(torch's own ninja call has no timeout), ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` are set in
the child's environment only, and the child and its compilers die with the parent (a process
group, ``PR_SET_PDEATHSIG`` and a watchdog), so a killed builder leaves no compiler running.

One module per concern: ``config`` (flags, sources, key, archs, record checks; torch-free, loaded
by path by setup.py), ``spec`` (the build this process would make), ``cache`` (roots, published
builds, cleaning), ``elf`` (a truncated library is refused before it is mapped), ``lock`` (the
build lock, torch's stale locks), ``worker`` (the build child process, run without importing
childopt), ``build`` (run the worker, publish), ``loader`` (the order above, once per process),
``cli`` (doctor, build, clean), and ``env`` and ``errors`` (the settings and the reporting they
share).
"""
from childopt._native.cli import build_main, clean_main, doctor_main
from childopt._native.errors import ExtensionUnavailable, NeedsBuild
from childopt._native.loader import check_installed_build, load, loaded, prebuilt_record, status, try_load

__all__ = ["load", "try_load", "loaded", "status", "prebuilt_record", "check_installed_build", "doctor_main",
           "build_main", "clean_main", "ExtensionUnavailable", "NeedsBuild"]
