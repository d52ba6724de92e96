"""A stand-in for Slicer's `slicer.parameterNodeWrapper` (Slicer >= 5.2), which the slicer-core wheel lacks.

It keeps parameters in a real `vtkMRMLScriptedModuleNode` in the strings Slicer's serializers write, so a
scene saved here holds what Slicer would read back: numbers and strings as `str(value)`, booleans as
"True"/"False", paths as `str(path)`, and an MRML node as a node reference whose role is the parameter's
name (plus an empty string parameter of that name, which tells "unset" from "set to None"). As in Slicer,
a wrapper writes the defaults of missing parameters when it is made, and `Choice`, `WithinRange`,
`Minimum` and `Maximum` annotations reject bad writes.

`connectGui(gui)` binds every widget of `gui` (a `childWidgetVariables` namespace) whose
`SlicerParameterName` property names a parameter: the parameter's value goes to the widget, the widget's
change signal writes the parameter, and a change of the parameter node updates the widgets. The widget
API used per parameter type is the one of Slicer's connector for the widget class KAFSegment.ui gives
that type; test_slicer_module.py checks those class/type pairs statically.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PARAMETER_NAME_PROPERTY = "SlicerParameterName"


@dataclass(frozen=True)
class Choice:
    choices: tuple

    def __init__(self, choices) -> None:
        object.__setattr__(self, "choices", tuple(choices))

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"{value!r} is not one of {self.choices}")


@dataclass(frozen=True)
class WithinRange:
    minimum: float
    maximum: float

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{value!r} is not within [{self.minimum}, {self.maximum}]")


@dataclass(frozen=True)
class Minimum:
    minimum: float

    def validate(self, value) -> None:
        if value < self.minimum:
            raise ValueError(f"{value!r} is below {self.minimum}")


@dataclass(frozen=True)
class Maximum:
    maximum: float

    def validate(self, value) -> None:
        if value > self.maximum:
            raise ValueError(f"{value!r} is above {self.maximum}")


def is_node_type(type_) -> bool:
    return isinstance(type_, type) and any(base.__name__ == "vtkMRMLNode" for base in type_.__mro__)


# (type check, default) of the value types Slicer's serializers handle; nodes are handled apart
_PLAIN_TYPES: dict[type, tuple[tuple[type, ...], Any]] = {
    bool: ((bool,), False),
    int: ((int,), 0),
    float: ((int, float), 0.0),
    str: ((str,), ""),
    Path: ((Path,), Path()),
}


@dataclass(frozen=True)
class Parameter:
    name: str
    type: type
    default: Any
    validators: tuple

    def has(self, node) -> bool:
        return bool(node.HasParameter(self.name))

    def write(self, node, value) -> None:
        self._check(value)
        if is_node_type(self.type):
            node.SetParameter(self.name, "")
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif self.type is bool:
            node.SetParameter(self.name, "True" if value else "False")
        else:
            node.SetParameter(self.name, str(value))

    def read(self, node):
        if not self.has(node):
            self.write(node, self.default)
        if is_node_type(self.type):
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        return text == "True" if self.type is bool else self.type(text)

    def _check(self, value) -> None:
        allowed = (self.type, type(None)) if is_node_type(self.type) else _PLAIN_TYPES[self.type][0]
        if not isinstance(value, allowed) or (self.type is not bool and isinstance(value, bool)):
            raise TypeError(f"{self.name}: {value!r} is not a {self.type.__name__}")
        for validator in self.validators:
            validator.validate(value)


def _parameter(name: str, hint, owner: type) -> Parameter:
    annotations = ()
    if typing.get_origin(hint) is typing.Annotated:
        hint, *annotations = typing.get_args(hint)
    if not is_node_type(hint) and hint not in _PLAIN_TYPES:
        raise TypeError(f"{owner.__name__}.{name}: no serializer for {hint}")
    default = getattr(owner, name) if hasattr(owner, name) else None
    if default is None and not is_node_type(hint):
        default = _PLAIN_TYPES[hint][1]
    return Parameter(name, hint, default, tuple(annotations))


class _Binding:
    """One widget bound to one parameter, through the widget API of Slicer's connector for it."""

    def __init__(self, widget, parameter: Parameter) -> None:
        self.widget = widget
        self.parameter = parameter
        self.callback = None  # set by connectGui
        choice = next((v for v in parameter.validators if isinstance(v, Choice)), None)
        self.choices = choice.choices if choice else None
        if self.choices is not None:  # Slicer's combo box connector fills the items itself
            widget.clear()
            for item in self.choices:
                widget.addItem(str(item))
        if is_node_type(parameter.type):
            widget.nodeTypes = [parameter.type.__name__]

    @property
    def signal(self):
        if is_node_type(self.parameter.type):
            return self.widget.currentNodeChanged
        if self.choices is not None:
            return self.widget.currentIndexChanged
        if self.parameter.type is bool:
            return self.widget.stateChanged
        if self.parameter.type is Path:
            return self.widget.currentPathChanged
        return self.widget.valueChanged

    def read(self):
        if is_node_type(self.parameter.type):
            return self.widget.currentNode()
        if self.choices is not None:
            return self.choices[self.widget.currentIndex]
        if self.parameter.type is bool:
            return bool(self.widget.checked)
        if self.parameter.type is Path:
            return Path(self.widget.currentPath)
        return self.parameter.type(self.widget.value)

    def write(self, value) -> None:
        if is_node_type(self.parameter.type):
            self.widget.setCurrentNode(value)
        elif self.choices is not None:
            self.widget.currentIndex = self.choices.index(value)
        elif self.parameter.type is bool:
            self.widget.checked = value
        elif self.parameter.type is Path:
            self.widget.currentPath = str(value)
        else:
            self.widget.value = value


class _WrapperMethods:
    """What `parameterNodeWrapper` adds to a class besides one property per parameter."""

    allParameters: dict[str, Parameter]

    def __init__(self, parameterNode) -> None:
        self.parameterNode = parameterNode
        self._guis: dict[int, tuple[list[_Binding], int]] = {}
        self._updating_gui = False
        for parameter in self.allParameters.values():
            if not parameter.has(parameterNode):
                parameter.write(parameterNode, parameter.default)

    def getValue(self, name: str):
        return self.allParameters[name].read(self.parameterNode)

    def setValue(self, name: str, value) -> None:
        self.allParameters[name].write(self.parameterNode, value)

    def default(self, name: str):
        return self.allParameters[name].default

    def connectGui(self, gui) -> int:
        bindings = []
        for widget in vars(gui).values():
            name = widget.property(PARAMETER_NAME_PROPERTY)
            if name:
                bindings.append(_Binding(widget, self.allParameters[name]))
        for binding in bindings:
            binding.write(self.getValue(binding.parameter.name))
            binding.callback = self._gui_changed_callback(binding)
            binding.signal.connect(binding.callback)
        observer = self.parameterNode.AddObserver("ModifiedEvent", lambda caller, event: self._update_gui())
        tag = max(self._guis, default=-1) + 1
        self._guis[tag] = (bindings, observer)
        return tag

    def disconnectGui(self, tag) -> None:
        bindings, observer = self._guis.pop(tag, ([], None))
        for binding in bindings:
            binding.signal.disconnect(binding.callback)
        if observer is not None:
            self.parameterNode.RemoveObserver(observer)

    def _gui_changed_callback(self, binding: _Binding):
        def changed(*_args) -> None:
            if not self._updating_gui:
                self.setValue(binding.parameter.name, binding.read())

        return changed

    def _update_gui(self) -> None:
        self._updating_gui = True
        try:
            for bindings, _ in self._guis.values():
                for binding in bindings:
                    binding.write(self.getValue(binding.parameter.name))
        finally:
            self._updating_gui = False

    def AddObserver(self, event, callback, priority: float = 0.0) -> int:
        return self.parameterNode.AddObserver(event, callback, priority)

    def RemoveObserver(self, tag: int) -> None:
        self.parameterNode.RemoveObserver(tag)

    def Modified(self) -> None:
        self.parameterNode.Modified()

    def StartModify(self) -> int:
        return self.parameterNode.StartModify()

    def EndModify(self, was_modifying: int) -> None:
        self.parameterNode.EndModify(was_modifying)


def parameterNodeWrapper(cls: type) -> type:
    hints = typing.get_type_hints(cls, include_extras=True)
    parameters = {name: _parameter(name, hint, cls) for name, hint in hints.items()}
    for parameter in parameters.values():
        setattr(
            cls,
            parameter.name,
            property(
                lambda self, name=parameter.name: self.getValue(name),
                lambda self, value, name=parameter.name: self.setValue(name, value),
            ),
        )
    namespace = {name: value for name, value in vars(_WrapperMethods).items() if not name.startswith("__")}
    for name, value in namespace.items():
        if name in parameters:
            raise ValueError(f"{cls.__name__}: '{name}' is a reserved name")
        setattr(cls, name, value)
    cls.__init__ = _WrapperMethods.__init__
    cls.allParameters = parameters
    return cls
