"""STAND-IN for ``slicer.parameterNodeWrapper`` (a mock; Slicer cannot run in CI).

Minimal: typed attributes stored in the parameter node, defaults, WithinRange and Choice validation,
node-type checks. connectGui/disconnectGui only record the ui they were given.
"""

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


def parameterNodeWrapper(cls):
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {name: _split(annotation) for name, annotation in hints.items()}
    defaults = {name: getattr(cls, name, None) for name in fields}

    class Wrapper:
        allParameters = fields

        def __init__(self, parameterNode):
            object.__setattr__(self, "parameterNode", parameterNode)
            for name, value in defaults.items():
                parameterNode.parameters.setdefault(name, value)

        def __getattr__(self, name):
            if name in fields:
                return self.parameterNode.parameters[name]
            raise AttributeError(name)

        def __setattr__(self, name, value):
            if name not in fields:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            base, validators = fields[name]
            if value is not None and isinstance(base, type) and not isinstance(value, base):
                raise TypeError(f"{name} must be a {base.__name__}, got {type(value).__name__}")
            for validator in validators:
                validator.validate(value)
            self.parameterNode.parameters[name] = value

        def connectGui(self, ui):
            self.parameterNode.connected_ui = ui
            return ui

        def disconnectGui(self, tag):
            self.parameterNode.connected_ui = None

    Wrapper.__name__ = Wrapper.__qualname__ = cls.__name__
    Wrapper.__doc__ = cls.__doc__
    return Wrapper
