#!/usr/bin/env bash
# Checks that merged models downloaded from molt load in HF transformers and give molt's
# logits, for both language families: starts `molt serve` on a scratch data dir with two base
# models — the demo model (Mamba-1, `MambaForCausalLM`) and the Mamba-2 fixture checkpoint
# (`tests/fixtures/mamba2/m2_tiny/model` with the tiny fixture's 512-id tokenizer, `Mamba2ForCausalLM`) —
# fine-tunes each (Mamba-1: LoRA on in/out_proj + Additional-scan, so the merge changes the
# state size; Mamba-2: LoRA on in/out_proj + LoRA_p on the B slice + norm.weight tuning),
# merges through POST /v1/adapters/{id}/merge, downloads config.json + model.safetensors, and
# compares `molt model forward` with transformers (installed into bench/.venv by
# bench/setup.sh). Not part of scripts/test.sh: it needs PyTorch (a multi-GB download).
# Usage: scripts/check-merged-transformers.sh   (BIN=path/to/molt to skip the build)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${BIN:-}" ]]; then cargo build --release --workspace; BIN=target/release/molt; fi
bash bench/setup.sh
W=$(mktemp -d /tmp/molt-hfcheck.XXXXXX)
D=$W/data; mkdir -p $D $W/models/demo $W/models/m2
cp models/demo/* $W/models/demo/
cp tests/fixtures/mamba2/m2_tiny/model/* $W/models/m2/
cp tests/fixtures/tiny/model/tokenizer.json $W/models/m2/   # 512 ids: fits its vocabulary
export MOLT_ADMIN_TOKEN=adm
$BIN serve --data-dir $D --models-dir $W/models --listen 127.0.0.1:18089 --workers 1 > $W/serve.log 2>&1 &
PID=$!; trap "kill $PID; rm -rf $W" EXIT
for i in $(seq 60); do curl -sf http://127.0.0.1:18089/healthz >/dev/null && break; sleep 1; done
KEY=$(cat $D/first-key); URL=http://127.0.0.1:18089; H="Authorization: Bearer $KEY"
python3 - > $W/train.jsonl <<'PY'
import json
for i in range(16): print(json.dumps({"text": f"It is a truth universally acknowledged, number {i}."}))
PY
F=$(curl -sf $URL/v1/files -H "$H" -F purpose=fine-tune -F file=@$W/train.jsonl | python3 -c 'import sys,json;print(json.load(sys.stdin)["id"])')
bench/.venv/bin/python -c "
import numpy as np, safetensors.numpy as s
ids=np.array([[5,17,300,42,7,99,411,3]],dtype=np.int64); s.save_file({'input_ids':ids},'$W/in.safetensors')"

check() {  # MODEL METHOD_JSON HF_CLASS
    local model=$1 method=$2 cls=$3 J S FT AID M OUTD
    J=$(curl -sf $URL/v1/fine_tuning/jobs -H "$H" -H 'Content-Type: application/json' -d "{\"model\":\"$model\",\"training_file\":\"$F\",\"method\":$method,\"hyperparameters\":{\"n_epochs\":1,\"batch_size\":4,\"learning_rate\":0.01}}" | python3 -c 'import sys,json;print(json.load(sys.stdin)["id"])')
    for i in $(seq 300); do S=$(curl -sf $URL/v1/fine_tuning/jobs/$J -H "$H" | python3 -c 'import sys,json;d=json.load(sys.stdin);print(d["status"], d.get("fine_tuned_model") or "")'); case $S in succeeded*) break;; failed*|cancelled*) echo "job: $S"; curl -sf $URL/v1/fine_tuning/jobs/$J -H "$H"; exit 1;; esac; sleep 1; done
    FT=$(echo $S | cut -d' ' -f2); echo "$model fine-tuned: $FT"
    AID=$(curl -sf $URL/v1/adapters/$FT -H "$H" | python3 -c 'import sys,json;print(json.load(sys.stdin)["id"])')
    M=$(curl -sf -X POST $URL/v1/adapters/$AID/merge -H "$H" -H 'Content-Type: application/json' -d '{}' | python3 -c 'import sys,json;print(json.load(sys.stdin)["id"])')
    echo "$model merged: $M"
    OUTD=$W/merged-$model; rm -rf $OUTD; mkdir -p $OUTD
    for f in config.json model.safetensors tokenizer.json; do curl -sf -o $OUTD/$f "$URL/v1/models/$M/files/$f" -H "$H"; done
    $BIN model forward --model $OUTD --input $W/in.safetensors --output $W/molt_out-$model.safetensors
    W=$W MODEL=$model CLS=$cls bench/.venv/bin/python - <<'PY'
import os, torch, safetensors.torch as st
import transformers
w, model = os.environ["W"], os.environ["MODEL"]
m = getattr(transformers, os.environ["CLS"]).from_pretrained(f"{w}/merged-{model}").eval()
ids = st.load_file(f"{w}/in.safetensors")["input_ids"]
with torch.no_grad(): hf = m(ids).logits.float()
ml = st.load_file(f"{w}/molt_out-{model}.safetensors")["logits"]
d = (hf - ml).abs().max().item()
print(model, type(m).__name__, "state_size", m.config.state_size, "logits", tuple(hf.shape), "max|transformers - molt|", d)
assert d < 1e-4, f"merged model differs in transformers: {d}"
print("ok")
PY
}

check demo '{"type":"hybrid","methods":[{"type":"lora","targets":["in_proj","out_proj"],"r":4},{"type":"additional_scan","n_add":2}]}' MambaForCausalLM
check m2 '{"type":"hybrid","methods":[{"type":"lora","targets":["in_proj","out_proj"],"r":4},{"type":"lora_p","slice":"B","r":2},{"type":"partial","target":"norm.weight"}]}' Mamba2ForCausalLM
