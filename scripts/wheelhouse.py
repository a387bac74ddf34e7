"""Wheels of every dependency except torch, for installing the project on a machine without internet.

    python scripts/wheelhouse.py PYTHON_VERSION PLATFORM OUT      (make wheelhouse runs this)

The dependency closure is read from .venv (the tested versions, see constraints.txt), starting from
pyproject's dependencies and its `test` extra. torch, torchvision and torch's CUDA/triton packages are
left out so that the cluster keeps its own CUDA torch; each other package is downloaded with --no-deps
as a wheel for PYTHON_VERSION on PLATFORM, and the project itself is built into a wheel. Anything that
cannot be had is listed, and the script fails.
"""
import re, shutil, subprocess, sys, tempfile, tomllib, zipfile
from importlib import metadata
from pathlib import Path
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

if len(sys.argv) != 4:
    sys.exit("usage: python scripts/wheelhouse.py PYTHON_VERSION PLATFORM OUT, e.g. 3.12 manylinux_2_28_x86_64 wheelhouse "
             "(make wheelhouse WHEEL_PYTHON=... WHEEL_PLATFORM=... runs it)")
python, platform, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
LEFT_OUT = {"torch", "torchvision", "triton", "pip", "setuptools", "wheel"}  # and nvidia-*, cuda-*

def left_out(name):
    return name in LEFT_OUT or name.startswith(("nvidia-", "cuda-"))

def no_cuda(name):  # torch's own dependencies (sympy, jinja2...) are kept, its CUDA stack is not
    return not (name == "triton" or name.startswith(("nvidia-", "cuda-")))

# a typo would otherwise reach pip: every download fails (each then retried alone to name it), or, for a manylinux
# glibc below 2.5, no --platform is passed at all and pip fetches this machine's wheels
LINUX_ARCH = "(x86_64|i686|aarch64|armv7l|ppc64le|s390x|riscv64)"
PLATFORM_TAG = (rf"manylinux_2_([5-9]|[1-9]\d+)_{LINUX_ARCH}|manylinux(1|2010|2014)_{LINUX_ARCH}|musllinux_1_\d+_{LINUX_ARCH}"
                rf"|linux_{LINUX_ARCH}|macosx_\d+_\d+_(x86_64|arm64|universal2)|win32|win_amd64|win_arm64")
if not re.fullmatch(PLATFORM_TAG, platform):
    sys.exit(f"make wheelhouse: WHEEL_PLATFORM={platform} is not a wheel platform tag; give one such as "
             f"manylinux_2_28_x86_64 (glibc 2.28 or newer on x86-64; `ldd --version` there tells the glibc), "
             f"manylinux_2_17_aarch64, macosx_11_0_arm64 or win_amd64")

from common.checkpoint import writable_folder  # noqa: E402 (it imports torch: not before the checks above)
from common.errors import UserError  # noqa: E402

try:  # else a traceback when the folder is made
    writable_folder(out, "make wheelhouse: WHEELHOUSE", "choose another WHEELHOUSE")
except UserError as error:
    sys.exit(str(error))

# pip only widens manylinux2014/2010 by itself, so list every older glibc tag the cluster also runs
platforms = [platform]
match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
if match:
    glibc, arch = int(match[1]), match[2]
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)]
    legacy = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5} if arch in ("x86_64", "i686") else {"manylinux2014": 17}
    platforms += [f"{tag}_{arch}" for tag, minor in legacy.items() if minor <= glibc]
machine = next((m for m in ("x86_64", "aarch64", "ppc64le", "s390x", "i686", "arm64") if platform.endswith(m)), "")
system = "Linux" if "linux" in platform else "Darwin" if platform.startswith("macosx") else "Windows" if platform.startswith("win") else ""
environment = default_environment()
environment.update(python_version=python, python_full_version=f"{python}.0", implementation_name="cpython",
                   platform_python_implementation="CPython")
if machine:
    environment["platform_machine"] = "AMD64" if platform == "win_amd64" else machine
if system:
    environment.update(platform_system=system, sys_platform={"Linux": "linux", "Darwin": "darwin", "Windows": "win32"}[system])

def wanted(requirement, extras):
    return requirement.marker is None or any(requirement.marker.evaluate({**environment, "extra": extra}) for extra in {"", *extras})

project = tomllib.loads(Path("pyproject.toml").read_text())
if not SpecifierSet(project["project"].get("requires-python", "")).contains(f"{python}.0"):
    sys.exit(f"make wheelhouse: the project needs Python {project['project']['requires-python']}, not WHEEL_PYTHON={python}")
test_extra = project["project"].get("optional-dependencies", {}).get("test", ["pytest"])
roots = project["project"]["dependencies"] + test_extra
problems, pins, parents, visited = [], {}, {}, set()
todo = [(Requirement(line), "pyproject.toml") for line in roots]
while todo:
    requirement, parent = todo.pop()
    name = canonicalize_name(requirement.name)
    if not wanted(requirement, ()) or not no_cuda(name):
        continue
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        problems.append(f"{name} (needed by {parent} on Python {python}) is not installed in .venv, so its tested version is unknown")
        continue
    if not requirement.specifier.contains(version, prereleases=True):
        problems.append(f"{name}: .venv has {version}, but {parent} needs {requirement.specifier}")
    if not left_out(name):
        pins[name] = version
        parents.setdefault(name, parent)
    extras = frozenset(requirement.extras)
    if (name, extras) in visited:
        continue
    visited.add((name, extras))
    for line in metadata.requires(name) or []:
        child = Requirement(line)
        if wanted(child, extras):
            child.marker = None
            todo.append((child, name))

tested = {}
for line in Path("constraints.txt").read_text().splitlines():
    if "==" in line and not line.lstrip().startswith("#"):
        key, _, value = line.split("#")[0].partition("==")
        tested[canonicalize_name(key.strip())] = value.strip()
for name, version in sorted(pins.items()):
    if name in tested and Version(tested[name]) != Version(version):
        problems.append(f"{name}: .venv has {version} but constraints.txt pins {tested[name]} (run make setup)")

out.mkdir(parents=True, exist_ok=True)
base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
        "--implementation", "cp", *[arg for tag in platforms for arg in ("--platform", tag)], "-d", str(out), "--quiet"]
specs = [f"{name}=={version}" for name, version in sorted(pins.items())]
print(f"downloading {len(specs)} wheels for Python {python} on {platform} into {out}/ (torch, torchvision, CUDA left out)", flush=True)
if subprocess.run(base + specs).returncode != 0:
    print("some downloads failed; retrying one at a time to name them", flush=True)
    for spec in specs:
        if subprocess.run(base + [spec], capture_output=True).returncode != 0:
            problems.append(f"no wheel of {spec} (needed by {parents[spec.split('==')[0]]}) for Python {python} on {platform}")

# the project itself, built from a copy of its sources (an in-tree build/ folder can carry deleted modules)
packages = project["tool"]["setuptools"]["packages"]
with tempfile.TemporaryDirectory() as tmp:
    for item in ["pyproject.toml", project["project"].get("readme", "README.md"), *{p.split(".")[0] for p in packages}]:
        if Path(item).is_dir():
            shutil.copytree(item, Path(tmp, item), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(item, tmp)
    for old in out.glob("latent_toolkit-*.whl"):
        old.unlink()
    if subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out.resolve()), tmp]).returncode != 0:
        problems.append("the latent-toolkit wheel could not be built")
for built in out.glob("latent_toolkit-*.whl"):
    with zipfile.ZipFile(built) as archive:
        inside = set(archive.namelist())
    sources = sorted({p.split(".")[0] for p in packages})
    missing = [str(f) for top in sources for f in sorted(Path(top).rglob("*.py")) if "__pycache__" not in f.parts and f.as_posix() not in inside]
    if missing:
        folders = sorted({str(Path(f).parent).replace("/", ".") for f in missing})
        problems.append(f"{built.name} lacks {len(missing)} source files ({', '.join(missing[:3])}...): "
                        f"pyproject.toml's [tool.setuptools] packages must also list {', '.join(folders)}")

# other versions of these packages left from an earlier run would win over the tested ones: remove them
# (wheels of other packages, e.g. a torch wheel put here on purpose, stay)
keep = {name: Version(version) for name, version in pins.items()}
keep["latent-toolkit"] = Version(project["project"]["version"])
wheels = []
for wheel in sorted(out.glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(wheel.name)
    if keep.get(name) == version:
        wheels.append(wheel)
    elif name in keep:
        print(f"removed {wheel.name}: this wheelhouse has {name} {keep[name]}")
        wheel.unlink()
print(f"{out}/: {len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / 2**20:.0f} MiB "
      f"(Python {python}, {platform}; install with: python -m pip install --no-index --find-links {out} latent-toolkit "
      f"{' '.join(Requirement(line).name for line in test_extra)})")  # all the tests need (conftest imports hypothesis)
if problems:
    print("\nmake wheelhouse: the wheelhouse is incomplete:", *dict.fromkeys(problems), sep="\n  ", file=sys.stderr)
    sys.exit(1)
