"""MOCK of ``slicer.parameterNodeWrapper`` (its GUI connectors need Qt), on the REAL parameter node.

Typed fields with defaults, stored in the vtkMRMLScriptedModuleNode as Slicer stores them: plain values
as string parameters, MRML nodes as node references. WithinRange and Choice validate on assignment.
connectGui/disconnectGui only record the ui they were given.
"""

import json
import typing


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"value {value} is not within [{self.minimum}, {self.maximum}]")


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f"value {value!r} is not one of {self.choices}")


def _split(annotation):
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return base, extras
    return annotation, []


def _is_node_type(base) -> bool:
    return isinstance(base, type) and base.__name__.startswith("vtkMRML")


def parameterNodeWrapper(cls):
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {name: _split(annotation) for name, annotation in hints.items()}
    defaults = {name: getattr(cls, name, None) for name in fields}

    class Wrapper:
        allParameters = fields

        def __init__(self, parameterNode):
            object.__setattr__(self, "parameterNode", parameterNode)
            object.__setattr__(self, "connectedUi", None)
            for name, value in defaults.items():
                if not _is_node_type(fields[name][0]) and not parameterNode.GetParameter(name):
                    parameterNode.SetParameter(name, json.dumps(value))

        def __getattr__(self, name):
            if name in ("AddObserver", "RemoveObserver", "HasObserver"):  # forwarded, as Slicer's wrapper does
                return getattr(self.parameterNode, name)
            if name not in fields:
                raise AttributeError(name)
            if _is_node_type(fields[name][0]):
                return self.parameterNode.GetNodeReference(name)
            return json.loads(self.parameterNode.GetParameter(name))

        def __setattr__(self, name, value):
            if name not in fields:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            base, validators = fields[name]
            if _is_node_type(base):
                if value is not None and not value.IsA(base.__name__):
                    raise TypeError(f"{name} must be a {base.__name__}, got {value.GetClassName()}")
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
                return
            if value is not None and isinstance(base, type) and not isinstance(value, base):
                raise TypeError(f"{name} must be a {base.__name__}, got {type(value).__name__}")
            for validator in validators:
                validator.validate(value)
            self.parameterNode.SetParameter(name, json.dumps(value))

        def connectGui(self, ui):
            object.__setattr__(self, "connectedUi", ui)
            return ui

        def disconnectGui(self, tag):
            object.__setattr__(self, "connectedUi", None)

    Wrapper.__name__ = Wrapper.__qualname__ = cls.__name__
    Wrapper.__doc__ = cls.__doc__
    return Wrapper
