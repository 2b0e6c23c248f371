"""Synthetic faces and the demo backbone that reads them (for demo.py, the tests and the benchmarks only).

Importing this package registers the ``demo_decoder`` architecture; commands load it with
``--set plugins="['synthetic']"``. Production code never imports it.
"""
from backbones import register_architecture
from synthetic.backbone import demo_decoder

register_architecture("demo_decoder", demo_decoder,
                      help="reads the identity and gender drawn into a synthetic face (demo, tests)")
