"""Check that the shipped configs still mean what they meant at another commit (default: HEAD).

    python tests/config_equivalence.py [--ref HEAD] [--cache DIR]

For every ``configs/**/*.yaml`` of the reference commit, each side (the reference commit's code and configs, from
``git archive``; this working tree's code and configs) is run in its own process, which records:

* ``print_config``: ``train.py fit --config X --print_config``, parsed as YAML (what the user's run is configured
  with; compared as dicts, so key order does not matter);
* ``stats``: the module's resolved corpus settings (``EditModule(...).stats_cfg`` after ``LightningCLI`` has built
  the module from X, i.e. after ``model.stats.dataset: null`` has been resolved);
* ``settings``: ``EditModule.run_settings()`` and the data module's hyper-parameters (what a checkpoint records and
  a resume compares).

A config is ``identical`` when all three agree, ``identical after stats resolution`` when they agree once
``model.stats.dataset`` of ``print_config`` is replaced by the resolved value (the other two must agree as they
are), and ``DIFFERENT`` otherwise (the differing keys are listed). Exit status 1 if any config differs or fails.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


def dump(root: Path, files: list[str], out: Path) -> None:
    """In this process (``lit_edit`` imported from ``root``): record each config's three views into ``out``."""
    import yaml
    from dataclasses import asdict

    import lit_edit
    from lit_edit import cli

    assert Path(lit_edit.__file__).resolve().is_relative_to(root.resolve()), (lit_edit.__file__, root)
    os.chdir(root)
    result = {}
    for rel in files:
        entry: dict = {}
        try:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
                cli.main(["fit", "--config", rel, "--print_config"])
            entry["print_config"] = yaml.safe_load(buf.getvalue())
            with tempfile.TemporaryDirectory() as tmp:  # loggers and checkpoints would write under ./runs
                os.chdir(tmp)
                try:
                    made = cli.EditCLI(cli.EditModule, cli.EditDataModule, run=False, seed_everything_default=0,
                                       args=["--config", str(root / rel)], save_config_kwargs={"overwrite": True})
                finally:
                    os.chdir(root)
            entry["stats"] = asdict(made.model.stats_cfg)
            entry["settings"] = json.loads(json.dumps(
                {"model": made.model.run_settings(), "data": dict(made.datamodule.hparams)}, default=repr))
        except Exception as err:  # noqa: BLE001  (reported per file)
            entry["error"] = f"{type(err).__name__}: {err}"
        result[rel] = entry
    out.write_text(json.dumps(result, indent=1, default=repr))


def diff(a, b, path="") -> list[str]:
    """Key paths where two parsed configs differ (dicts compared by key, lists by position)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in (diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}" if path else str(k)))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} -> {b!r}"]


def side(root: Path, files: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, str(HERE), "--dump", str(root), str(out), *files], check=True, env=env,
                   cwd=root, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="HEAD")
    p.add_argument("--cache", type=Path, help="keep the reference side's record here, keyed by commit")
    p.add_argument("--dump", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.dump:
        root, out, *files = a.dump
        dump(Path(root), files, Path(out))
        return 0
    sha = subprocess.check_output(["git", "rev-parse", a.ref], cwd=REPO, text=True).strip()
    listed = subprocess.check_output(["git", "ls-tree", "-r", "--name-only", sha, "configs"], cwd=REPO, text=True)
    files = sorted(f for f in listed.split() if f.endswith(".yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cached = a.cache / f"ref-{sha}.json" if a.cache else None
        if cached and cached.exists():
            old = json.loads(cached.read_text())
        else:
            ref_root = tmp / "ref"
            ref_root.mkdir()
            archive = subprocess.run(["git", "archive", sha], cwd=REPO, check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(ref_root)], input=archive, check=True)
            if (REPO / "data" / "cache").exists():  # the world's generated files, shared (read-only use)
                (ref_root / "data").mkdir(exist_ok=True)
                (ref_root / "data" / "cache").symlink_to((REPO / "data" / "cache").resolve())
            old = side(ref_root, files, tmp / "ref.json")
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(old))
        new = side(REPO, files, tmp / "new.json")
    bad = 0
    print(f"reference {a.ref} ({sha[:10]}) vs working tree, {len(files)} configs")
    for rel in files:
        o, n = old[rel], new.get(rel, {"error": "missing"})
        if "error" in o or "error" in n:
            bad += 1
            print(f"ERROR      {rel}: ref {o.get('error', 'ok')} | new {n.get('error', 'ok')}")
            continue
        raw = diff(o["print_config"], n["print_config"])
        other = diff(o["stats"], n["stats"], "resolved stats_cfg") + diff(o["settings"], n["settings"], "run_settings")
        resolved = json.loads(json.dumps(n["print_config"]))
        resolved["model"]["stats"]["dataset"] = n["stats"]["dataset"]
        after = diff(o["print_config"], resolved)
        if not raw and not other:
            print(f"identical  {rel}")
        elif not after and not other and raw == [f"model.stats.dataset: {o['stats']['dataset']!r} -> None"]:
            print(f"identical  {rel}  (after stats resolution: model.stats.dataset null -> "
                  f"{n['stats']['dataset']!r}, was {o['stats']['dataset']!r})")
        else:
            bad += 1
            print(f"DIFFERENT  {rel}:")
            for d in (after or raw) + other:
                print(f"    {d}")
    print(f"{len(files) - bad} of {len(files)} equivalent")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
