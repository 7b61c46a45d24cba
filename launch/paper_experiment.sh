#!/usr/bin/env bash
# docs/results.md's experiment (issue 21), every piece in order, each one resumable: rerun the
# script after an interruption (stage 1 resumes from its last checkpoint, the evaluation from
# its finished cells).
#
#   launch/paper_experiment.sh                 # everything, ~15-20 h on 2 CPU cores
#   PIECES="skill eval" launch/paper_experiment.sh   # some pieces only
#
# Pieces: skill (stage 1, configs/skill.py:paper), eval (the 9-task suite on its final
# checkpoint), curve (the unseen-data track at steps 75 and 150, then the plot), union and
# lora (the controls' stage 1), eval_union and eval_lora (their evaluation; curve and the
# controls copy the skill-free base cells from eval, so eval runs first), controls (the GD
# router of eval against each control's, row by row: python -m mdkif_jax.compare), archive
# (no computing: the finished cells of every evaluation so far into $PUBLISH, as below). Each
# piece's wall, CPU and peak memory are appended to $RUNS/timings.tsv; the small outputs
# (results JSON/MD/PNG, never checkpoints) are copied to $PUBLISH.
#
# Runs do not outlive a new checkout ($RUNS is not in git), so an evaluation's cells are
# archived in $PUBLISH/NAME/cells (python -m mdkif_jax.cells_archive: without the data's
# text) when it finishes, and by `PIECES=archive` before a session ends with one unfinished;
# commit them. An evaluation restores the archived cells instead of recomputing them
# (--config.restore_cells_from) once its config, prompting and skills are the archive's: stage 1
# retrained from scratch gives the same weights bit for bit (same code, same machine kind).
# Without a stage 1 in $RUNS (PIECES without skill in a new checkout), eval rebuilds the
# archived table from the archive and the data alone, so the controls need no retrained skills.
#
# A piece is rerun after an interruption (it continues from its checkpoint or cells) and
# skipped once it has finished; one that builds on another (curve and eval_union/eval_lora on
# eval, eval_union on union, eval_lora on lora, controls on all three evaluations) stops
# unless that one has finished, so two chains can split the pieces safely. timings.tsv gets
# a row for each run of a piece that ends (done or failed); a run killed with its session
# leaves none, so a piece's wall and CPU time are its evaluation cells' own (`seconds`,
# `cpu_seconds`) and stage 1's metrics.jsonl
# (`interval_wall_s`, `interval_cpu_s`).
#
# Environment: RUNS (default runs/paper), PUBLISH (default docs/results/paper), PYTHON
# (default .venv/bin/python if present, else python3), PIECES (default: every piece but
# archive, in the order above), NICE (default 0: the niceness every piece runs at; started as its own session, with
# setsid, the script also sets its session's autogroup niceness: Linux shares the CPU between
# sessions before it looks at a process's niceness, so a nice 19 chain beside another chain
# would otherwise still take half the cores), EVAL_PROCS (default 1: with N > 1
# the eval piece first runs N processes side by side, eval_part1..N, each on some of the
# suite's tasks in its own workdir, dealt afresh at each start by the cells a task has left
# after the archive (an earlier start's parts archived first), then gathers their cells into
# $RUNS/eval and assembles there; an evaluation process keeps about one core busy, so 2 on a
# 2-core machine), WAIT
# (default 0: a piece whose prerequisite has not finished stops the chain; N > 0: it waits,
# looking every N seconds, so two chains can hold every piece between them from the start).
set -euo pipefail

cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/paper}
PUBLISH=${PUBLISH:-docs/results/paper}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PIECES=${PIECES:-skill eval curve union lora eval_union eval_lora controls}
NICE=${NICE:-0}
if ((NICE > 0)) && [[ $(ps -o sid= -p $$ | tr -d ' ') == "$$" && -w /proc/self/autogroup ]]; then
  echo "$NICE" >/proc/self/autogroup || true
fi
EVAL_PROCS=${EVAL_PROCS:-1}
WAIT=${WAIT:-0}
mkdir -p "$RUNS" "$PUBLISH"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

# run NAME ARGS...: one resumable piece, timed, its output in $RUNS/NAME.log; a piece that
# finished ($RUNS/.done_NAME) is skipped
run() {
  local name=$1
  shift
  if [[ -f $RUNS/.done_$name ]]; then
    echo "== $name: done (delete $RUNS/.done_$name to run it again)" >&2
    return
  fi
  echo "== $name: $*" >&2
  local t="$RUNS/.time_$name"
  if ! nice -n "$NICE" /usr/bin/time -f "%e %U %S %M" -o "$t" "$@" >>"$RUNS/$name.log" 2>&1; then
    echo "error: piece $name failed; see $RUNS/$name.log" >&2
    exit 1
  fi
  read -r wall user sys rss <"$t"
  awk -v n="$name" -v c="$commit" -v d="$(date -u +%FT%TZ)" -v w="$wall" -v u="$user" \
    -v s="$sys" -v m="$rss" 'BEGIN { printf "%s\t%s\t%s\t%.1f\t%.1f\t%.2f\n", n, c, d, w, u + s, m / 1048576 }' \
    >>"$RUNS/timings.tsv"
  touch "$RUNS/.done_$name"
}

main() { run "$1" "$PYTHON" -m mdkif_jax.main "${@:2}"; }

archive() {  # archive NAME [AS]: the evaluation's finished cells, without the data's text
  "$PYTHON" -m mdkif_jax.cells_archive "$RUNS/$1" "$PUBLISH/${2:-$1}"
}

publish() {  # publish NAME: its cells and identity files (archive checks them), its tables
  archive "$1"
  cp "$RUNS/$1"/results.{json,md,png} "$PUBLISH/$1/"
  if [[ -f $RUNS/$1/router_weights.png ]]; then cp "$RUNS/$1/router_weights.png" "$PUBLISH/$1/"; fi
}

# needs PIECE...: stop unless each piece has finished (a later piece on an unfinished one
# would score half-trained skills or recompute cells the other chain is computing); with
# WAIT > 0, look again every WAIT seconds instead (the other chain is running it: if that
# chain fails or never runs it, this one waits until it is killed)
needs() {
  local d
  for d; do
    if [[ ! -f $RUNS/.done_$d ]] && ((WAIT > 0)); then
      echo "== $piece: waiting for $d to finish (another chain; checked every ${WAIT}s)" >&2
      while [[ ! -f $RUNS/.done_$d ]]; do sleep "$WAIT"; done
    fi
    if [[ ! -f $RUNS/.done_$d ]]; then
      echo "error: piece $piece needs $d finished first (PIECES=$d, or wait for the chain running it)" >&2
      exit 1
    fi
  done
}

# gather SRC DEST: every file under SRC into DEST but those DEST already has (`cp -n`, whose
# exit status on a skipped file differs between coreutils releases)
gather() {
  local f rel
  while IFS= read -r -d '' f; do
    rel=${f#"$1"/}
    if [[ ! -e $2/$rel ]]; then mkdir -p "$(dirname "$2/$rel")" && cp "$f" "$2/$rel"; fi
  done < <(find "$1" -type f -print0)
}

# restore NAME: sets `restored` to the flag that restores evaluation NAME's archived cells, if any
restore() {
  restored=()
  if [[ -d $PUBLISH/$1/cells ]]; then restored=("--config.restore_cells_from=$PUBLISH/$1"); fi
}

# a new checkout's runs go on from the published rows (the copy at the end would drop them)
if [[ ! -f $RUNS/timings.tsv && -f $PUBLISH/timings.tsv ]]; then cp "$PUBLISH/timings.tsv" "$RUNS/"; fi
[[ -f $RUNS/timings.tsv ]] || printf 'piece\tcommit\tfinished\twall_s\tcpu_s\tpeak_rss_gb\n' >"$RUNS/timings.tsv"
for piece in $PIECES; do
  case $piece in
    skill) main skill --config=configs/skill.py:paper --workdir="$RUNS/skill" ;;
    eval)
      if [[ ! -f $RUNS/.done_skill && ! -d $RUNS/skill && -d $PUBLISH/eval/cells ]]; then
        # no stage 1 in this checkout: the table rebuilt from the archive and the data alone
        # (no skills_from: every cell must be archived), for the pieces built on eval; timed
        # as eval_archive (seconds, not the evaluation's hours)
        main eval_archive --config=configs/eval.py:paper \
          --config.restore_cells_from="$PUBLISH/eval" --workdir="$RUNS/eval"
        touch "$RUNS/.done_eval"
        continue
      fi
      if ((EVAL_PROCS > 1)) && [[ ! -f $RUNS/.done_eval ]]; then
        # the finished cells into the archive first (the parts', and the suite's own from a
        # run with fewer processes): a task may move to another part
        for dir in "$RUNS"/eval/cells "$RUNS"/eval_part*/cells; do
          if [[ -d $dir ]]; then archive "$(basename "$(dirname "$dir")")" eval; fi
        done
        rm -f "$RUNS"/.done_eval_part* # a part's tasks are dealt afresh each time
      fi
      restore eval
      if ((EVAL_PROCS > 1)) && [[ ! -f $RUNS/.done_eval ]]; then
        get='from configs import eval as e; from mdkif_jax import evaluate_suite as s; '
        get+='c = e.get_config("paper"); print(len(s.cells_of(s.method_table(c.methods), c.cmaes.seeds)), *c.tasks)'
        read -r -a got < <("$PYTHON" -c "$get") || true
        if ((${#got[@]} < 2)); then echo "error: no tasks from configs/eval.py:paper" >&2; exit 1; fi
        per_task=${got[0]} tasks=("${got[@]:1}")
        # deal the tasks to the parts by the cells each has left to compute (most first, each
        # to the part with the fewest so far), so that the parts finish close together
        parts=() load=()
        for ((i = 1; i <= EVAL_PROCS; i++)); do parts[i]="" load[i]=0; done
        while read -r left j; do
          best=1
          for ((i = 2; i <= EVAL_PROCS; i++)); do ((load[i] < load[best])) && best=$i; done
          parts[best]+="${parts[best]:+,}'${tasks[j]}'" load[best]=$((load[best] + left))
        done < <(
          for j in "${!tasks[@]}"; do
            d=$PUBLISH/eval/cells/${tasks[j]} n=0
            if [[ -d $d ]]; then n=$(find "$d" -name '*.json' | wc -l); fi
            echo "$((per_task > n ? per_task - n : 0)) $j"
          done | sort -s -k1,1nr
        )
        pids=()
        for ((i = 1; i <= EVAL_PROCS; i++)); do
          [[ -n ${parts[i]} ]] || continue # more processes than tasks
          list=${parts[i]}
          main "eval_part$i" --config=configs/eval.py:paper --config.skills_from="$RUNS/skill" \
            --workdir="$RUNS/eval_part$i" "--config.tasks=($list,)" "${restored[@]}" &
          pids+=($!)
        done
        failed=0 # a failed part stops the piece once the others have stopped too
        for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
        ((failed == 0)) || exit 1
        mkdir -p "$RUNS/eval/cells"
        for ((i = 1; i <= EVAL_PROCS; i++)); do
          if [[ -d $RUNS/eval_part$i/cells ]]; then gather "$RUNS/eval_part$i/cells" "$RUNS/eval/cells"; fi
        done
      fi
      main eval --config=configs/eval.py:paper --config.skills_from="$RUNS/skill" \
        --workdir="$RUNS/eval" "${restored[@]}"
      publish eval
      ;;
    curve)
      needs eval
      for step in 75 150; do
        restore "curve_$step"
        main "curve_$step" --config=configs/eval.py:paper,curve \
          --config.skills_from="$RUNS/skill" --config.skills_step=$step \
          --config.reuse_cells_from="$RUNS/eval" --workdir="$RUNS/curve_$step" "${restored[@]}"
        publish "curve_$step"
      done
      "$PYTHON" -m mdkif_jax.curve "$RUNS/skill" "$RUNS/curve_75" "$RUNS/curve_150" \
        "$RUNS/eval" --out "$PUBLISH/learning_curve.png"
      ;;
    union | lora) main "$piece" --config=configs/skill.py:paper,$piece --workdir="$RUNS/$piece" ;;
    eval_union | eval_lora)
      needs "${piece#eval_}" eval
      restore "$piece"
      main "$piece" --config=configs/eval.py:paper,control \
        --config.skills_from="$RUNS/${piece#eval_}" --config.reuse_cells_from="$RUNS/eval" \
        --workdir="$RUNS/$piece" "${restored[@]}"
      publish "$piece"
      ;;
    controls)
      needs eval eval_union eval_lora
      run controls "$PYTHON" -m mdkif_jax.compare "$RUNS/eval" "$RUNS/eval_union" "$RUNS/eval_lora" \
        --labels "AdaLoRA skills" "union AdaLoRA" "LoRA skills" --out "$PUBLISH/controls.png"
      ;;
    archive)  # every evaluation with cells, the others even when one is refused
      failed=()
      for name in eval curve_75 curve_150 eval_union eval_lora; do
        # an eval rebuilt from the archive alone has nothing to add to it
        if [[ $name == eval && -f $RUNS/.done_eval_archive ]]; then continue; fi
        if [[ -d $RUNS/$name/cells ]] && ! archive "$name"; then failed+=("$name"); fi
      done
      for dir in "$RUNS"/eval_part*/cells; do # EVAL_PROCS's parts: the suite's cells too
        name=$(basename "$(dirname "$dir")")
        if [[ -d $dir ]] && ! archive "$name" eval; then failed+=("$name"); fi
      done
      if ((${#failed[@]})); then
        echo "error: not archived: ${failed[*]} (the reason is above)" >&2
        exit 1
      fi
      ;;
    *)
      echo "error: unknown piece $piece (skill eval curve union lora eval_union eval_lora controls archive)" >&2
      exit 2
      ;;
  esac
done
cp "$RUNS/timings.tsv" "$PUBLISH/timings.tsv"
