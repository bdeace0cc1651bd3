#!/usr/bin/env bash
# The installed package works from any directory (what `pip install ftctl` gives): build the wheel, install it into
# a fresh virtualenv that reuses the dependencies already in .venv, and from an unrelated directory run `ftctl list`,
# launcher dry runs with a shipped accelerate config and a shipped DeepSpeed config, a shipped recipe's dry run, and
# the demo (train, then score before/after).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

.venv/bin/python -m pip wheel --no-deps -q -w "$work/dist" .
wheel=$(ls "$work"/dist/ftctl-*.whl)
for shipped in ds_configs/zero2.json accelerate_configs/cpu_2proc.yaml recipes/demo.yaml launch/slurm/ \
        tasks/data/demo_sentiment/train.jsonl LICENSE; do
    .venv/bin/python -c "import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist(); \
sys.exit(0 if any(sys.argv[2] in n for n in names) else 'the wheel lacks ' + sys.argv[2])" "$wheel" "$shipped"
done

.venv/bin/python -m venv "$work/venv"
new_site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The dependencies, as a plain path entry: .venv's own editable ftctl is a .pth there, which a path entry never runs.
.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$new_site/_ftctl_dependencies.pth"
"$work/venv/bin/python" -m pip install --no-deps -q "$wheel"

mkdir "$work/elsewhere"
cd "$work/elsewhere"
export PATH="$work/venv/bin:$PATH" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FTCTL_CACHE="$work/cache"
unset PYTHONPATH
installed=$(python -c 'import launch, os; print(os.path.dirname(os.path.dirname(launch.__file__)))')
[ "$installed" = "$new_site" ] || { echo "wheel check: launch imported from $installed, not the wheel"; exit 1; }
[ "$installed" != "$repo" ]

ftctl list > list.txt && grep -q "sst2" list.txt && grep -q "p_tuning_v2" list.txt
ftctl train --accelerate-config cpu_2proc --dry-run --task sst2 | grep -q "accelerate_configs/cpu_2proc.yaml"
ftctl train --accelerate-config deepspeed_zero2 --num-processes 2 --dry-run --task sst2 \
    | grep -q "ds_configs/zero2.json"
ftctl train --deepspeed zero2 --dry-run --task sst2 | grep -q -- "--deepspeed zero2"
ftctl grid demo --dry-run > grid.txt && grep -q "minilm__sst2__lora__seed42" grid.txt
ftctl train --task sst2 --method lora --output-dir runs/demo-sst2-lora
ftctl evaluate runs/demo-sst2-lora --baseline
echo "wheel check: passed ($wheel installed in a fresh virtualenv, run from $work/elsewhere)"
