"""A/B: the benchmarks of a base revision and of this tree, interleaved in one sitting ("no slowdown").

    python benchmarks/ab.py --base REV [--scripts dense,sparse,...] [--cases NAME,...] [--repeats N]
                            [--threads N] [--rounds 3] [--extra 'SCRIPT:ARGS' ...] [--json PATH]

The base is REV checked out in a git worktree under the temp folder (``<tmp>/memattn-ab/<sha>``, made once and
reused by later runs; ``--remove-worktree`` deletes it at the end). The head is the tree this file sits in, as
it is on disk (uncommitted changes included). For each script, one after the other, ``--rounds`` rounds run
base, head, base, head ...; every run is a fresh process with ``PYTHONPATH=<that tree>/src`` and ``--json`` to a
temp file. Records are matched by (case, impl, baseline, n-th occurrence: paged.py's thread sweep repeats a
case); per match it prints the median over the rounds of each side's time_s, head / base, and a verdict:
"faster" (< 0.97), "within 3%" or "SLOWER" (> 1.03). ``base_drift`` is the same ratio for the record's
baseline (torch SDPA, HF...), which is the same code on both sides: it shows how much the machine itself
moved, i.e. how far a verdict can be trusted.

The flags given (--cases, --repeats, --threads) go to both sides alike. A base older than the common
harness may not know them, so each script's base command is chosen by what its ``--help`` accepts:
1. the base tree's own script, with each flag or its old spelling (``--only`` for one --cases text, ``--reps``
   for --repeats), when it accepts them all;
2. else this tree's script run against the base tree's src (same workload code both sides, only the library
   differs), when it imports and parses there;
3. else the base's own script with the flags it knows; the others are dropped on both sides (said in the
   output and in each row's ``dropped_flags``). ring.py and serve.py land here against a base before the
   harness (the head scripts need memattn APIs that base lacks): select their cases with --extra, e.g.
   ``--extra 'ring:--seqlens 16384 --ranks 2'``, which goes verbatim to both sides.
Each row says which in ``base_cmd``. ``--extra SCRIPT:ARGS`` (repeatable) appends a script's own flags.
The exit status is 1 when a row is SLOWER, else 0.

The full before/after comparison of issue 12 (hours on 2 cores):

    python benchmarks/ab.py --base ea8038b --scripts dense,sparse,linear,paged,serve,ring --rounds 3 \\
        --json benchmarks/results/ab.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _harness  # noqa: E402

SCRIPTS = ["dense", "sparse", "linear", "paged", "serve", "ring"]
TOLERANCE = 0.03


def git(*args, cwd) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def base_tree(rev: str, head_root: str) -> tuple[str, str]:
    """(path, sha) of a worktree of `rev` under the temp folder, made now or reused from an earlier run."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}", cwd=head_root)
    path = os.path.join(tempfile.gettempdir(), "memattn-ab", sha[:12])
    if os.path.isdir(path):
        try:
            if git("rev-parse", "HEAD", cwd=path) == sha:
                return path, sha
        except subprocess.CalledProcessError:
            pass
        try:  # a worktree at another commit, or a leftover folder that is none
            git("worktree", "remove", "--force", path, cwd=head_root)
        except subprocess.CalledProcessError:
            shutil.rmtree(path)
    git("worktree", "prune", cwd=head_root)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    git("worktree", "add", "--detach", path, sha, cwd=head_root)
    return path, sha


def _env(tree: str) -> dict:
    return dict(os.environ, PYTHONPATH=os.path.join(tree, "src"))


def check_import(tree: str) -> None:
    """Fail early unless ``import memattn`` under this tree's PYTHONPATH loads this tree's memattn."""
    out = subprocess.run([sys.executable, "-c", "import memattn; print(memattn.__file__)"], env=_env(tree),
                         capture_output=True, text=True)
    src = os.path.realpath(os.path.join(tree, "src"))
    if out.returncode or not os.path.realpath(out.stdout.strip()).startswith(src + os.sep):
        sys.exit(f"PYTHONPATH={src} does not import that tree's memattn: {out.stdout.strip()} {out.stderr[-500:]}")


def _help(script: str, tree: str, args=()) -> tuple[int, set]:
    """(exit status, the flags named in the help) of ``script [args] --help`` against `tree`'s src. Putting
    the args first makes argparse check their values (choices, types) before --help exits."""
    out = subprocess.run([sys.executable, script, *args, "--help"], env=_env(tree), cwd=tree,
                         capture_output=True, text=True)
    return out.returncode, set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout))


def _wanted(args) -> list:
    """[(flag, values, {old spelling: values or None when it cannot say the same})] of the common flags given."""
    want = []
    if args.cases:
        want.append(("--cases", args.cases, {"--only": args.cases if len(args.cases) == 1 else None}))
    if args.repeats is not None:
        want.append(("--repeats", [str(args.repeats)], {"--reps": [str(args.repeats)]}))
    if args.threads is not None:
        want.append(("--threads", [str(args.threads)], {}))
    return want


def _render(want, known: set) -> tuple[list, list]:
    """(argument list, flags the script does not know) for `want` against the flags a script's help names."""
    argv, missing = [], []
    for flag, values, old in want:
        spelling = next((o for o, v in old.items() if o in known and v is not None), None)
        if flag in known:
            argv += [flag, *values]
        elif spelling is not None:
            argv += [spelling, *old[spelling]]
        else:
            missing.append(flag)
    return argv, missing


def plan(name: str, base: str, head: str, want, extra: list) -> dict:
    """How to run `name` on each side: {base_script, base_args, head_args, base_cmd, dropped_flags}."""
    head_script, base_script = (os.path.join(t, "benchmarks", f"{name}.py") for t in (head, base))
    head_args, _ = _render(want, _help(head_script, head)[1])
    if os.path.exists(base_script):
        base_args, missing = _render(want, _help(base_script, base)[1])
        if not missing and _help(base_script, base, base_args + extra)[0] == 0:
            return dict(base_script=base_script, base_args=base_args, head_args=head_args,
                        base_cmd="base script", dropped_flags=[])
    if _help(head_script, base, head_args + extra)[0] == 0:
        return dict(base_script=head_script, base_args=head_args, head_args=head_args,
                    base_cmd="head script on base src", dropped_flags=[])
    if not os.path.exists(base_script):
        raise RuntimeError(f"{name}: no such script in the base, and this tree's does not run against its src")
    known = _help(base_script, base)[1]
    kept = [w for w in want if _render([w], known)[0]]
    dropped = [w[0] for w in want if w not in kept]
    print(f"[{name}] the base script lacks {', '.join(dropped)} and this tree's script does not run against the "
          f"base src: both sides run without them", flush=True)
    return dict(base_script=base_script, base_args=_render(kept, known)[0],
                head_args=_render(kept, _help(head_script, head)[1])[0],
                base_cmd="base script, flags dropped", dropped_flags=dropped)


def run_once(script: str, tree: str, argv: list, tmp: str, label: str) -> list | None:
    """One run as a fresh process; its records, or None (after printing the log's tail) when it failed."""
    out = os.path.join(tmp, label + ".json")
    log = os.path.join(tmp, label + ".log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, script, *argv, "--json", out], env=_env(tree), cwd=tree,
                            stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"  {label}: {time.perf_counter() - t0:.1f} s, exit {rc}", flush=True)
    if rc != 0 or not os.path.exists(out):
        with open(log) as f:
            print("    " + "".join(f.readlines()[-15:]).replace("\n", "\n    "), flush=True)
        return None if rc != 0 else []
    with open(out) as f:
        return json.load(f)


def _keyed(records: list) -> dict:
    """{(case, impl, baseline, n): record}: n counts earlier records with the same triple (thread sweeps)."""
    seen, out = {}, {}
    for r in records:
        key = (r.get("case"), r.get("impl"), r.get("baseline"))
        n = seen[key] = seen.get(key, -1) + 1
        out[(*key, n)] = r
    return out


def _median(rounds: list, key, field):
    vals = [k[key][field] for k in rounds if key in k and isinstance(k[key].get(field), (int, float))]
    return statistics.median(vals) if vals else None, vals


def _verdict(ratio) -> str:
    if ratio is None:
        return "untimed"
    return "faster" if ratio < 1 - TOLERANCE else ("within 3%" if ratio <= 1 + TOLERANCE else "SLOWER")


def compare(name: str, base_runs: list, head_runs: list, how: dict) -> list:
    """One row per record present on both sides."""
    base_k, head_k = [_keyed(r) for r in base_runs], [_keyed(r) for r in head_runs]
    keys = [k for k in (head_k[0] if head_k else {}) if any(k in b for b in base_k)]
    unmatched = {k for b in base_k for k in b} - set(keys)
    if unmatched:
        print(f"[{name}] {len(unmatched)} base record(s) without a head match: {sorted(map(str, unmatched))[:5]}")
    rows = []
    for key in keys:
        bt, b_all = _median(base_k, key, "time_s")
        ht, h_all = _median(head_k, key, "time_s")
        bb, _ = _median(base_k, key, "baseline_time_s")
        hb, _ = _median(head_k, key, "baseline_time_s")
        ratio = ht / bt if bt and ht else None
        rows.append(dict(script=name, case=key[0], impl=key[1], baseline=key[2], occurrence=key[3],
                         base_time_s=bt, head_time_s=ht, ratio=ratio, verdict=_verdict(ratio),
                         base_drift=hb / bb if hb and bb else None, base_times=b_all, head_times=h_all,
                         base_peak_mib=_median(base_k, key, "peak_mib")[0],
                         head_peak_mib=_median(head_k, key, "peak_mib")[0],
                         base_cmd=how["base_cmd"], dropped_flags=how["dropped_flags"]))
    return rows


def main(argv=None) -> int:
    p = _harness.parser(__doc__, repeats=None)
    p.add_argument("--base", required=True, help="the revision to compare against (e.g. ea8038b)")
    p.add_argument("--scripts", default=",".join(SCRIPTS),
                   help="comma-separated benchmark scripts (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="base, head pairs per script (default 3)")
    p.add_argument("--extra", action="append", default=[], metavar="SCRIPT:ARGS",
                   help="a script's own flags, for both sides (e.g. 'dense:--seq-lens 1024')")
    p.add_argument("--remove-worktree", action="store_true", help="delete the base worktree at the end")
    args = p.parse_args(argv)
    head = os.path.dirname(HERE)
    base, sha = base_tree(args.base, head)
    check_import(base)
    check_import(head)
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", cwd=head))
    head_rev = git("rev-parse", "HEAD", cwd=head)[:12] + ("+changes" if dirty else "")
    print(f"base {sha[:12]} at {base}; head {head_rev} at {head}; {args.rounds} rounds", flush=True)
    extras = {}
    for e in args.extra:
        script, _, rest = e.partition(":")
        extras.setdefault(script, []).extend(shlex.split(rest))
    rows = []
    with tempfile.TemporaryDirectory(prefix="memattn-ab-") as tmp:
        for name in [s for s in args.scripts.split(",") if s]:
            extra = extras.get(name, [])
            how = plan(name, base, head, _wanted(args), extra)
            print(f"[{name}] base: {how['base_cmd']}", flush=True)
            runs = {"base": [], "head": []}
            for r in range(args.rounds):
                for side, script, tree, a in (("base", how["base_script"], base, how["base_args"]),
                                              ("head", os.path.join(head, "benchmarks", f"{name}.py"), head,
                                               how["head_args"])):
                    recs = run_once(script, tree, a + extra, tmp, f"{name}-{side}-{r}")
                    if recs is not None:
                        runs[side].append(recs)
            new = compare(name, runs["base"], runs["head"], how)
            if not new:
                print(f"[{name}] no records to compare", flush=True)
            rows += new
    for row in rows:
        row.update(base_rev=sha, head_rev=head_rev, rounds=args.rounds, cpu_model=_harness.cpu_model())
    _harness.print_table(rows, ["script", "case", "impl", "baseline", "base_time_s", "head_time_s", "ratio",
                                "verdict", "base_drift"])
    if args.remove_worktree:
        git("worktree", "remove", "--force", base, cwd=head)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if any(r["verdict"] == "SLOWER" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
