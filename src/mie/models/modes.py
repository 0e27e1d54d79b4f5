"""Train/eval mode for a stretch of code."""
from contextlib import contextmanager


@contextmanager
def eval_mode(*modules):
    """Put ``modules`` in eval mode (BatchNorm running statistics, no dropout) and give each its own
    previous mode back afterwards, also when the body raises."""
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(modules, was):
            m.train(training)
