"""Does this environment hold exactly the locked versions?

    python requirements/check.py [requirements/lock.txt]

Prints one line and exits 0 when every installed distribution is pinned by the lock (its
marker true here) at exactly the locked version. Unpinned, only what the lock leaves out
on purpose may be installed: torch and what goes with it (torchvision, nvidia-*, cuda-*,
and triton on a GPU box, where bootstrap drops the lock's triton line), this project
itself, and the venv's own pip. Exits 1 listing every difference otherwise.
server/bootstrap.sh runs it after each install; tests/test_install.py runs it with
`pip check`. Standard library plus `packaging` (vendored by pip, so always importable).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

try:
    from packaging.markers import Marker
except ImportError:  # pragma: no cover - pip always has it
    from pip._vendor.packaging.markers import Marker

UNLOCKED = re.compile(r"^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+|pip|qwen3-vl-server)$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """name -> version for the lock lines whose marker holds on this interpreter."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, _, marker = line.partition(";")
        name, _, version = spec.strip().partition("==")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        pins[norm(name)] = version.strip()
    return pins


def installed():
    """The distributions installed in this environment's site-packages.  Not
    ``metadata.distributions()`` alone: that walks ``sys.path``, which a running program
    may have grown (importing setuptools adds its vendored packages' folder), and would
    then list what is merely importable."""
    import sysconfig
    paths = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    return metadata.distributions(path=paths)


def differences(pins: dict[str, str]) -> list[str]:
    out = []
    for dist in installed():
        name = norm(dist.metadata["Name"] or "")
        if name in ("pip", "setuptools", "wheel"):
            continue  # the venv's own tools (setuptools is pinned only as torch 2.13's need)
        if name in pins:
            if dist.version != pins[name]:
                out.append(f"{name}=={dist.version} is installed, the lock says {pins[name]}")
        elif name and not UNLOCKED.match(name):
            out.append(f"{name}=={dist.version} is installed but not in the lock")
    return sorted(out)


def main(argv: list[str]) -> int:
    lock = Path(argv[0] if argv else Path(__file__).with_name("lock.txt"))
    pins = read_lock(lock)
    diff = differences(pins)
    installed_count = sum(1 for d in installed())
    if diff:
        print(f"[lock] {len(diff)} of {installed_count} installed packages differ from {lock.name}:")
        for d in diff:
            print("  " + d)
        return 1
    print(f"[lock] {installed_count} installed packages: every one at its locked version "
          f"(or left out of the lock on purpose: torch and its pins, pip, this project)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
