"""One module per paper. Each holds its ``nn.Module``s, its loss as a dict of named terms, and one
function that runs it with :func:`kaviz.train.fit`:

- :mod:`kaviz.methods.kd` — soft-target distillation from one or several teachers into the
  comprehensive label space (the KD baseline of the amalgamation papers), union evaluation;
- :mod:`kaviz.methods.cfl` — Common Feature Learning (IJCAI 2019);
- :mod:`kaviz.methods.lshfm` — feature mimicking with locality-sensitive hashing (TPAMI 2021);
- :mod:`kaviz.methods.consistency` — Knowledge Consistency (ICLR 2020);
- :mod:`kaviz.methods.layerwise` — layer-wise knowledge amalgamation (AAAI 2019);
- :mod:`kaviz.methods.customize` — customised amalgamation from heterogeneous teachers (ICCV 2019);
- :mod:`kaviz.methods.sbm` — Student Becoming the Master (CVPR 2019);
- :mod:`kaviz.methods.recombination` — combining and pruning distinct-task teachers.

Import the one you need (``from kaviz.methods import cfl``); nothing is imported here.
"""
