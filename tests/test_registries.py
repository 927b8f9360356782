"""One registry per kind of per-op knowledge: every IR op must be known to each of them."""

from slimc import interpreter, ops


def test_every_op_has_an_interpreter_kernel():
    assert set(ops.OPS) <= set(interpreter.KERNELS), sorted(set(ops.OPS) - set(interpreter.KERNELS))


def test_every_op_has_a_tvm_lowering():
    from slimc.targets.lower import LOWERINGS

    assert set(ops.OPS) <= set(LOWERINGS), sorted(set(ops.OPS) - set(LOWERINGS))


def test_every_op_documents_its_operands():
    for name, d in ops.OPS.items():
        assert d.inputs, name
        assert all(isinstance(a.kind, str) for a in d.attrs.values()), name
