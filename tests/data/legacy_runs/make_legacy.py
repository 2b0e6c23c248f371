import sys, shutil, hashlib, json
from pathlib import Path
sys.path.insert(0, '/tmp/orig'); sys.path.insert(0, '/tmp/orig/tests')
import torch
from helpers import synthetic_world, demo_cfg
from utils.synthetic import save_demo_backbone
from backbones import ProjectionLayer
from pipeline import train as finetune
from pipeline.sweep import evaluate
root = Path('/tmp/legacy_world'); shutil.rmtree(root, ignore_errors=True)
synthetic_world(root, n_train_ids=24, imgs=4, n_test_ids=24, test_imgs=4, pairs=200, gender=96, seed=3)
save_demo_backbone(root / 'ckpt' / 'Demo' / 'reference' / 'backbone.pth', 128)
cfg = demo_cfg(root, 'embedding_size=128', 'num_epoch=4', 'checkpoint_every=2', 'batch_size=16')
res = finetune.train(cfg)
print(res.checkpoint_dir, res.checkpoints)
out = evaluate(cfg, root / 'results', root / 'ckpt' / 'Demo', 'Exp/Synth', root / 'results' / 'ref128.csv')
# released-format layer on a 512-d backbone
save_demo_backbone(root / 'ckpt512' / 'reference' / 'backbone.pth', 512)
torch.manual_seed(123)
rel = root / 'ckpt512' / 'Released' / 'Synth' / '20L1_1L2'; rel.mkdir(parents=True)
torch.save(ProjectionLayer(512, 512, 2).state_dict(), rel / '1000ftn_layers.pth')
cfg2 = demo_cfg(root, f"output_ori={root / 'ckpt512' / 'reference' / 'backbone.pth'}")
out2 = evaluate(cfg2, root / 'results512', root / 'ckpt512', 'Released/Synth', root / 'results512' / 'ref512.csv')
h = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
print(json.dumps({'bin': h(root/'rec'/'synth_a.bin'), 'released': h(rel/'1000ftn_layers.pth')}))
