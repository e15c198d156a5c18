#!/usr/bin/env bash
# Generator variants on the `small` zoo -> results/generator_small.json.
# Needs `deltalora run --preset small` first (zoo + Delta Activations). Resumable: a killed
# train-generator continues; finished generators are skipped.
set -euo pipefail
W=${W:-runs/small}
STEPS=${STEPS:-150}
TASKS=${TASKS:?comma-separated tasks to assess, one per domain}
for v in dnd A1 A2 B C; do
  if [ ! -f "$W/generators/$v/generator.safetensors" ]; then
    deltalora train-generator --preset small -w "$W" --variant "$v" \
      --set generator.steps="$STEPS" --set generator.stage1_steps="$STEPS"
  fi
done
[ -f "$W/generators/retrieval/config.json" ] || deltalora train-generator --preset small -w "$W" --variant retrieval
deltalora assess --preset small -w "$W" --tasks "$TASKS" --draws "${DRAWS:-2}" --n-test "${N_TEST:-100}" \
  -g "$W/generators/dnd" -g "$W/generators/A1" -g "$W/generators/A2" -g "$W/generators/B" -g "$W/generators/C" \
  -g "$W/generators/retrieval" --out results/generator_small.json
# dnd with a longer schedule (cheap: no exact-δ terms), added to the same results file
if [ ! -f "$W/generators/dnd_1500steps/generator.safetensors" ]; then
  deltalora train-generator --preset small -w "$W" --variant dnd --out "$W/generators/dnd_1500steps" --set generator.steps=1500
fi
deltalora assess --preset small -w "$W" --tasks "$TASKS" --draws "${DRAWS:-2}" --n-test "${N_TEST:-100}" \
  -g "$W/generators/dnd_1500steps" --out results/generator_small.json --merge
