#!/usr/bin/env bash
# Runs the pipeline on a capped subset twice, on BASE (in a temporary git worktree) and on the
# checked-out code, then `transferlab gate` between them: OUTPUT.md gets the gate's report (checks,
# headline metrics, per-class deltas, error diff, `dvc metrics diff`, `dvc params diff`, timing
# apart), gate-report/ its files (error_diff.csv, error_diff.png).
#
#   usage: metrics_report.sh BASE_REV CAP_PER_CLASS OUTPUT.md [extra `dvc exp run -S` overrides...]
#
# Exits with the gate's status: 0 passed, 1 a threshold failed (params.yaml `gate:`), 2 missing
# metrics. Both runs use the same subset (split.max_images_per_class=CAP) and the same embedding
# cache, so the comparison is like for like and the second run embeds only what changed.
set -euo pipefail
base_rev=$1 cap=$2 output=$3
shift 3
overrides=(-S "split.max_images_per_class=${cap}")
for override in "$@"; do overrides+=(-S "$override"); done

worktree=$(mktemp -d)
trap 'git worktree remove --force "$worktree" >/dev/null 2>&1 || rm -rf "$worktree"' EXIT
git worktree add --detach --quiet "$worktree" "$base_rev"
(
  cd "$worktree"
  dvc exp run "${overrides[@]}"
  git add -A metrics dvc.lock params.yaml
  git -c user.name=transferlab-ci -c user.email=ci@transferlab.invalid commit --quiet --allow-empty -m "metrics of ${base_rev} on the CI subset"
)
baseline=$(git -C "$worktree" rev-parse HEAD)

dvc exp run "${overrides[@]}"
status=0
transferlab gate --baseline "$baseline" --out gate-report || status=$?
{
  echo "Base: \`${base_rev}\` (${baseline:0:8}); this change: the workspace; both on the CI subset (${cap} images per class)."
  echo
  if [[ -f gate-report/report.md ]]; then
    cat gate-report/report.md
  else
    echo "## transferlab gate: could not run (exit ${status}); see the job's log"
  fi
} > "$output"
cat "$output"
exit "$status"
