"""What a peer needs beyond a GPU machine's image: the packages to check before a run, and the pip
command that downloads them as wheels on the development machine (see scripts/bench_gpu.py)."""

import importlib.util
from importlib.metadata import PackageNotFoundError, version

# What a peer needs beyond the GPU image (device KINDS.md), with the versions installed here.
WHEELS = [
    "transformers",
    "fastapi",
    "starlette",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "opentelemetry-api",
    "uvicorn",
    "cryptography",
    "cffi",
    "pycparser",
    "llguidance",
]
NEEDED_IMPORTS = ("torch", "transformers", "safetensors", "httpx", "xxhash", "fastapi", "uvicorn")
NEEDED_IMPORTS += ("pydantic", "cryptography", "llguidance")
MIN_TRANSFORMERS = (5, 24)


def wheels_command() -> str:
    pins = []
    for name in WHEELS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    platforms = " ".join(
        f"--platform {p}"
        for p in [f"manylinux_2_{n}_x86_64" for n in (35, 34, 31, 28, 27, 24, 17)]
        + ["manylinux2014_x86_64", "manylinux1_x86_64"]
    )
    return (
        "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
        f"{platforms} -d .whl {' '.join(pins)}"
    )


def missing_packages() -> list[str]:
    missing = [name for name in NEEDED_IMPORTS if importlib.util.find_spec(name) is None]
    try:
        have = tuple(int(x) for x in version("transformers").split(".")[:2])
        if have < MIN_TRANSFORMERS:
            missing.append(
                f"transformers>={'.'.join(map(str, MIN_TRANSFORMERS))} (found {version('transformers')})"
            )
    except (PackageNotFoundError, ValueError):
        pass
    return missing
