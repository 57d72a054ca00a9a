"""Mutation testing of the modules where a silent bug corrupts results, with mutmut (config: [tool.mutmut]
in pyproject.toml; `pip install -e '.[mutation]'`). Not part of the test suite: run it by hand or as its own
CI job, niced, one module group at a time:

    python bench/mutation.py                      # every group below, then the score table
    python bench/mutation.py ppo_math combine     # some groups
    python bench/mutation.py --report             # only the table, from the results in mutants/
    python bench/mutation.py --list               # the groups and their mutant globs

mutmut copies the tree into mutants/ (git-ignored), records which fast tests reach each function (the
selection in pyproject.toml: no tiny-pipeline fixture) and runs, for each mutant, only those tests.
A group is a set of mutant-name globs (`module.x_function__mutmut_N`), so the stage `run` bodies, which only
the tiny pipeline exercises (tests/test_invariants.py, tests/test_stages.py), can be left out of a group and
reported as such. Score = killed (incl. timeouts) / (checked mutants - equivalent); mutants mutmut has not run
(new, or reset after a source edit) are counted apart as "not checked". Survivors judged equivalent are
listed in EQUIVALENT with the reason, and in the README's "Mutation testing" section.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = [sys.executable, "-m", "mutmut"]

# group -> mutant-name globs
GROUPS: dict[str, list[str]] = {
    "ppo_math": ["policies.ppo_math.*"],
    "combine": ["reward_models.combine.*"],
    "losses": ["reward_models.losses.*"],
    "rm_data": ["reward_models.data.*"],
    "scoring": ["reward_models.scoring.*"],
    "eval_stats": ["policies.eval_stats.*"],
    "ppo_wiring": ["policies.ppo.x_build_batch*", "policies.ppo.x_forward_policy*", "policies.ppo.x_advantages*",
                   "policies.ppo.x_guard*", "policies.ppo.x__select*"],
    "rs_selection": ["policies.rejection_sampling.x_best_of_k*", "policies.rejection_sampling.x_reward_vs_k*"],
    "gatt": ["policies.ghost_attention.x_combine_instructions*", "policies.ghost_attention.x_system_message*",
             "policies.ghost_attention.x_with_instruction*", "policies.ghost_attention.x_synthesis_context*",
             "policies.ghost_attention.x_training_dialogue*", "policies.ghost_attention.x_late*",
             "policies.ghost_attention.x_adherence_by_turn*"],
    "packing": ["policies.trainer.x_pack_examples*", "policies.trainer.x_collate*", "policies.trainer.x_token_loss_sum*"],
    "rm_train": ["reward_models.train.x_aux_safety_loss*", "reward_models.train.x_accuracy_report*"],
    "registry": ["pipeline.registry.*"],
}

# the fast test files that exercise each module (used by --recheck)
TESTS_FOR: dict[str, list[str]] = {
    "policies.ppo_math": ["tests/test_ppo_math.py", "tests/test_wiring.py"],
    "policies.eval_stats": ["tests/test_eval_stats.py", "tests/test_eval_stats_units.py"],
    "reward_models.data": ["tests/test_wiring.py", "tests/test_data_mix.py::test_weighted_sizes",
                           "tests/test_data_mix.py::test_mix_ratios_with_static_sets_by_domain_and_weight",
                           "tests/test_data_mix.py::test_static_sets_group_rows_by_set_and_domain"],
    "reward_models": ["tests/test_losses.py", "tests/test_wiring.py"],
    "policies": ["tests/test_wiring.py"],
    "pipeline.registry": ["tests/test_registry_units.py"],
}

# surviving mutants judged equivalent (the behaviour cannot change), with the reason
_NAN = "float('NAN') is float('nan'): the same NaN"
_DTYPE = ("np.asarray(values) without dtype=float: per-prompt values are floats or bools/ints, whose means "
          "(the only arithmetic on them here) are the same floats")
EQUIVALENT: dict[str, str] = {
    "policies.eval_stats.x_bootstrap_ci__mutmut_11": _NAN,
    "policies.eval_stats.x_bootstrap_ci__mutmut_14": _NAN,
    "policies.eval_stats.x_paired_bootstrap_diff__mutmut_17": _NAN,
    "policies.eval_stats.x_paired_bootstrap_diff__mutmut_20": _NAN,
    "policies.eval_stats.x_paired_bootstrap_diff__mutmut_23": _NAN,
    "policies.eval_stats.x_bootstrap_ci__mutmut_4": _DTYPE,
    "policies.eval_stats.x_bootstrap_ci__mutmut_6": _DTYPE,
    **{f"policies.eval_stats.x_paired_bootstrap_diff__mutmut_{i}": (
        "np.asarray without dtype=float on ONE of a, b: the other is float, so a[idx].mean(1) - b[idx].mean(1) "
        "and stat(a) - stat(b) give the same floats") for i in (4, 6, 8, 10)},
    "policies.eval_stats.x__resample_indices__mutmut_4": "rng.integers(m, size) is rng.integers(0, m, size): low defaults to 0, same draws",
    "policies.ghost_attention.x_synthesis_context__mutmut_11": ("system_message(short=None) instead of short=False: "
                                                                 "`... if short else ...` treats None like False"),
    "policies.rejection_sampling.x_reward_vs_k__mutmut_14": ("`if k < K` instead of `k <= K` when listing the k: "
                                                              "k == K is added anyway by `| {K}`"),
    **{f"reward_models.scoring.xǁRewardScorerǁscore__mutmut_{i}": (
        "torch.tensor(is_safety) without dtype=torch.bool: the three gate functions read the flags only through "
        "`is_safety.bool()`, and torch already infers bool from a list of bools") for i in (33, 35)},
    **{f"pipeline.registry.xǁRegistryǁ_live_status__mutmut_{i}": (
        "locks.lease_state(path) without the lease just read: lease_state re-reads the same file (only a write "
        "between the two reads could tell them apart)") for i in (28, 30)},
    "pipeline.registry.xǁRegistryǁlineage__mutmut_17": "parent = '' instead of None on a corrupt manifest: both are falsy, the same 'missing' node",
    **{f"pipeline.registry.xǁRegistryǁrepair__mutmut_{i}": (
        "a corrupt manifest's artifact found by _artifact_dir_of(path) instead of path.parent: for "
        "artifacts/<stage>/<dir>/manifest.json both are artifacts/<stage>/<dir>") for i in (27, 32, 33)},
    "pipeline.registry.xǁRegistryǁrepair__mutmut_78": ("work dir name r<round>-<version> split at the last dash instead of the "
                                                       "first: versions are hex (no dash; build keys depend on it), one dash"),
    **{name: ("a manifest without finished_at ranks as 1 instead of 0: finished_at is a Unix time (> 1e9), so it "
              "ranks oldest either way") for name in ("pipeline.registry.xǁRegistryǁfind__mutmut_36",
                                                       "pipeline.registry.xǁRegistryǁversions__mutmut_16")},
    **{f"policies.ppo_math.x_logprobs_from_logits__mutmut_{i}": (
        "a dim of the per-row (A, V) log-softmax / gather / (un)squeeze written as +1 or None instead of -1: on "
        "2-D rows (logits are (B, A, V), iterated row by row) and 1-D labels they are the same dimension")
        for i in (10, 12, 13, 15, 18, 20)},
    **{f"policies.ppo_math.x_per_token_rewards__mutmut_{i}": why for i, why in (
        (24, "-2 instead of -1 as the 'no real token' sentinel: only `last >= 0` reads it"),
        (30, "nonzero() of a 1-D tensor is (N, 1): squeeze(+1) is squeeze(-1)"),
        (31, "squeeze(-2) leaves (N, 1) index tensors (or (1,) when N = 1): the same elements get the score"),
        (5, "the bool mask instead of mask.to(kl.dtype) in a product: bool * float promotes to the same floats"))},
    "policies.ppo_math.x_masked_whiten__mutmut_25": "out * mask without .to(x.dtype): bool * float promotes to the same floats",
    "policies.ppo_math.x_gae__mutmut_4": ("the bool mask instead of mask.to(rewards.dtype): gae only multiplies by it, and "
                                          "bool * float promotes to the same floats"),
    "policies.trainer.x_pack_examples__mutmut_2": ("truncate when len(ids) >= seq_len instead of >: an example of exactly "
                                                   "seq_len tokens sliced [-seq_len:] is the same list"),
    "policies.trainer.x_token_loss_sum__mutmut_27": ("F.cross_entropy without ignore_index=IGNORE: its default ignore_index "
                                                     "is -100, which is IGNORE"),
    "policies.eval_stats.x_bootstrap_ci__mutmut_24": ("`stat is np.mean and False` sends np.mean through the generic path, "
                                                      "np.array([np.mean(arr[i]) for i in idx]): the same numbers, slower"),
}

RECHECK = ROOT / "mutants" / "recheck.json"

KILLED = {"killed", "timeout", "caught by type check"}


# One OpenMP/intra-op thread in mutmut and its workers. mutmut forks each worker from a process in which torch
# has already run OpenMP regions; with more than one thread, a forked worker's next parallel torch op waits on
# the parent's thread team, which does not exist in the child, until the wall-clock limit fires: a deadlock
# (0 CPU seconds, stuck in libgomp's gomp_team_barrier_wait_end) that mutmut records as a "timeout", i.e. a kill.
SERIAL_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_groups(names: list[str], max_children: int) -> int:
    """One mutmut run over the groups' globs (mutants are generated and the test mapping collected once).
    Naming the globs makes mutmut rerun every matching mutant, cached verdict or not."""
    cmd = ["nice", "-n", "10", *MUTMUT, "run", "--max-children", str(max_children), *(p for n in names for p in GROUPS[n])]
    print("$", " ".join(cmd), flush=True)
    forget_rechecks(names)
    return subprocess.call(cmd, cwd=ROOT, env={**os.environ, **SERIAL_ENV})


def results() -> dict[str, str]:
    """mutmut's verdict per mutant, with survivors that --recheck found killed by newer tests marked killed."""
    out = subprocess.run([*MUTMUT, "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True).stdout
    res = dict(m.groups() for m in re.finditer(r"^\s*(\S+): (.+)$", out, re.M))
    if RECHECK.is_file():
        for name, verdict in json.loads(RECHECK.read_text()).items():
            if res.get(name) in ("survived", "no tests") and verdict == "killed":
                res[name] = "killed"
    return res


def forget_rechecks(groups: list[str]) -> None:
    """Drop the --recheck verdicts of `groups`: a fresh mutmut run re-judges them, and after a source edit mutmut
    renumbers a function's mutants, so a recheck verdict kept under the old name would judge another mutant."""
    if RECHECK.is_file():
        done = json.loads(RECHECK.read_text())
        RECHECK.write_text(json.dumps({n: v for n, v in done.items()
                                       if not any(fnmatch.fnmatch(n, p) for g in groups for p in GROUPS[g])}, indent=1))


def recheck(groups: list[str]) -> None:
    """Run each surviving mutant of `groups` against the CURRENT tests (copied into mutants/tests), the way
    mutmut's workers do (MUTANT_UNDER_TEST), without invalidating mutmut's cache; verdicts go to
    mutants/recheck.json and count in the table. For tests added after a mutmut run."""
    shutil.copytree(ROOT / "tests", ROOT / "mutants" / "tests", dirs_exist_ok=True)
    done = json.loads(RECHECK.read_text()) if RECHECK.is_file() else {}
    for name in survivors(groups):
        module = name.split(".x_")[0].split(".xǁ")[0]
        files = next(v for k, v in TESTS_FOR.items() if module == k or module.startswith(k + "."))
        env = {**os.environ, **SERIAL_ENV, "MUTANT_UNDER_TEST": name}
        rc = subprocess.call(["nice", "-n", "10", sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                              "-p", "tests.mutation_plugin", *files], cwd=ROOT / "mutants", env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done[name] = "killed" if rc == 1 else "survived" if rc == 0 else f"error {rc}"
        print(f"{done[name]:9} {name}", flush=True)
        RECHECK.write_text(json.dumps(done, indent=1))


def table(groups: list[str]) -> str:
    res = results()
    lines = ["| group | mutants | not checked | killed | of which timeouts | survived | no tests | equivalent | score |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g in groups:
        names = [n for n in res if any(fnmatch.fnmatch(n, p) for p in GROUPS[g])]
        st = [res[n] for n in names if res[n] != "not checked"]
        unchecked = len(names) - len(st)  # new since the last run, or reset by mutmut after a source edit
        if not st:
            lines.append(f"| {g} | {len(names)} | not run | | | | | | |")
            continue
        equiv = sum(1 for n in names if n in EQUIVALENT and res[n] != "not checked")
        killed = sum(s in KILLED for s in st)
        timeouts = st.count("timeout")
        no_tests = st.count("no tests")
        survived = sum(s not in KILLED for s in st) - no_tests - equiv
        denom = len(st) - equiv
        lines.append(f"| {g} | {len(names)} | {unchecked} | {killed} | {timeouts} | {survived} | {no_tests} | {equiv} | "
                     f"{100 * killed / max(1, denom):.0f}%{' of the checked' if unchecked else ''} |")
    return "\n".join(lines)


def survivors(groups: list[str]) -> list[str]:
    res = results()
    return sorted(n for n, s in res.items() if s not in KILLED and s != "not checked" and n not in EQUIVALENT
                  and any(fnmatch.fnmatch(n, p) for g in groups for p in GROUPS[g]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", nargs="*", help=f"groups to run (default: all): {', '.join(GROUPS)}")
    ap.add_argument("--report", action="store_true", help="only print the table from mutants/")
    ap.add_argument("--survivors", action="store_true", help="list surviving, non-equivalent mutants (mutmut show NAME)")
    ap.add_argument("--list", action="store_true", help="print the groups and their globs")
    ap.add_argument("--recheck", action="store_true", help="rerun the survivors against the current tests (after adding tests)")
    ap.add_argument("--max-children", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    groups = args.groups or list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        ap.error(f"unknown group(s) {unknown}; known: {', '.join(GROUPS)}")
    if args.list:
        for g in groups:
            print(g, " ".join(GROUPS[g]))
        return 0
    if args.recheck:
        recheck(groups)
    elif not (args.report or args.survivors):
        run_groups(groups, args.max_children)
    if args.survivors:
        print("\n".join(survivors(groups)))
    else:
        print(table(groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
