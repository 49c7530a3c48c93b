"""The model zoo: Flax Linen modules, one module per family, looked up by name.

    from fnlearn.models import ResNet18
    model = fnlearn.models.get("simple_net")
"""
from fnlearn.models.basics import ActivatedLinear
from fnlearn.models.basics import CNN
from fnlearn.models.basics import CustomLinear
from fnlearn.models.basics import DynamicNet
from fnlearn.models.basics import Linear
from fnlearn.models.basics import LinearRegression
from fnlearn.models.basics import Net
from fnlearn.models.basics import RecurrentNet
from fnlearn.models.basics import RegressionNet
from fnlearn.models.basics import SimpleNet
from fnlearn.models.basics import VariableDepthMLP
from fnlearn.models.registry import get
from fnlearn.models.registry import names
from fnlearn.models.registry import register

register("linear_regression", LinearRegression)
register("regression_net", RegressionNet)
register("net", Net)
register("simple_net", SimpleNet)
register("cnn", CNN)
register("dynamic_net", DynamicNet)
register("variable_depth_mlp", VariableDepthMLP)
register("recurrent_net", RecurrentNet)
