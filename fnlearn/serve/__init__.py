"""The batched HTTP inference server: `python -m fnlearn.serve --artifact FILE --port N`."""
from fnlearn.serve.app import Batcher
from fnlearn.serve.app import Metrics
from fnlearn.serve.app import RequestError
from fnlearn.serve.app import bucketed
from fnlearn.serve.app import make_app
