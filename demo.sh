#!/usr/bin/env bash
# The CPU demo: write the phantom dataset, train a small RepUX-Net with the paper's 21^3 kernels and BFR on it
# (about 10 minutes on 2 cores), then segment the phantom test images with the best weights and score them
# against their labels. Run again, it continues an interrupted run where its last checkpoint left it and does
# not train a finished one again (--resume auto); FRESH=1 bash demo.sh trains from scratch.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data/phantom}
RUN=${RUN:-runs/phantom_repuxnet}
START=(--resume auto)
[ "${FRESH:-0}" = 1 ] && START=(--overwrite)
[ -f "$DATA/dataset.json" ] || python phantom.py --output "$DATA"
python main_train.py --root "$DATA" --output "$RUN" --dataset flare --network REPUXNET \
  --roi_size 32 --feat_size 16,32,64,128 --kernel_size 21 --hidden_size 128 \
  --lr 1e-3 --max_iter 1000 --eval_step 200 --cache_rate 1 --num_workers 2 --device auto "${START[@]}"
python test_seg.py --root "$DATA" --output "$RUN/predictions" --dataset flare \
  --trained_weights "$RUN/best_metric_model.pth" --evaluate
