"""MOCK of the Qt widgets a loaded .ui gives the module (slicer-core has no Qt): ``loadUI`` reads the
module's REAL .ui file and makes one plain Python object per named widget, of a class that keeps the
state the widget code reads and writes (text, enabled, value, checked, rows) and calls the slots it
connects when the state changes as a user's click would. No drawing, no layout, no event loop: the
tests call the slots the way Qt would (button clicks, timer ticks).
"""

import inspect
import xml.etree.ElementTree as ElementTree


def _arity(slot, available: int) -> int:
    """How many positional arguments ``slot`` takes (at most ``available``)."""
    parameters = inspect.signature(slot).parameters.values()
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return available
    return min(available, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters))


class Widget:
    """Any widget: named, enabled, a tool tip, signals connected to slots."""

    def __init__(self, name: str, properties: dict):
        self.name, self.enabled, self.toolTip, self.visible = name, True, "", True
        self.text = properties.get("text", "")
        self._slots = {}
        self.scene = None
        if properties.get("enabled") is not None:
            self.enabled = properties["enabled"] == "true"

    def connect(self, signal: str, slot) -> None:
        self._slots.setdefault(signal.split("(")[0], []).append(slot)

    def emit(self, signal: str, *args) -> None:
        """Call the connected slots; like PythonQt, a slot that takes fewer arguments gets the first ones."""
        for slot in self._slots.get(signal, []):
            slot(*args[:_arity(slot, len(args))])

    def setMRMLScene(self, scene) -> None:
        self.scene = scene


class QPushButton(Widget):
    def click(self) -> None:
        """A user's click: only an enabled button does anything (as in Qt)."""
        if self.enabled:
            self.emit("clicked", False)


class QCheckBox(Widget):
    def __init__(self, name, properties):
        super().__init__(name, properties)
        self._checked = False

    @property
    def checked(self) -> bool:
        return self._checked

    @checked.setter
    def checked(self, value: bool) -> None:
        if bool(value) != self._checked:
            self._checked = bool(value)
            self.emit("toggled", self._checked)


class QSpinBox(Widget):
    def __init__(self, name, properties):
        super().__init__(name, properties)
        self.minimum = int(properties.get("minimum", 0))
        self._maximum = int(properties.get("maximum", 99))
        self._value = int(properties.get("value", self.minimum))

    @property
    def maximum(self) -> int:
        return self._maximum

    @maximum.setter
    def maximum(self, value: int) -> None:
        self._maximum = int(value)
        self.value = min(self._value, self._maximum)

    @property
    def value(self) -> int:
        return self._value

    @value.setter
    def value(self, value: int) -> None:
        value = max(self.minimum, min(self._maximum, int(value)))  # Qt clamps to the range
        if value != self._value:
            self._value = value
            self.emit("valueChanged", value)


class QComboBox(Widget):
    def __init__(self, name, properties):
        super().__init__(name, properties)
        self.items = []

    @property
    def count(self) -> int:
        return len(self.items)

    def addItems(self, items) -> None:
        self.items += list(items)


class QProgressBar(Widget):
    def __init__(self, name, properties):
        super().__init__(name, properties)
        self.value = 0


class QTableWidget(Widget):
    def __init__(self, name, properties, columns=()):
        super().__init__(name, properties)
        self.columns, self.cells, self._rows = list(columns), {}, 0

    def setRowCount(self, rows: int) -> None:
        self._rows = rows
        self.cells = {key: item for key, item in self.cells.items() if key[0] < rows}

    def rowCount(self) -> int:
        return self._rows

    def setItem(self, row: int, column: int, item) -> None:
        self.cells[(row, column)] = item

    def item(self, row: int, column: int):
        return self.cells.get((row, column))

    def rowTexts(self) -> list:
        """Every row's cell texts (a test helper, not Qt)."""
        return [[getattr(self.item(r, c), "text", "") for c in range(len(self.columns))] for r in range(self._rows)]


class Root(Widget):
    """The .ui's top widget: holds every named child."""

    def __init__(self, name, children):
        super().__init__(name, {})
        self.childWidgets = children

    def setMRMLScene(self, scene) -> None:
        super().setMRMLScene(scene)
        for child in self.childWidgets.values():
            child.setMRMLScene(scene)


_CLASSES = {"QPushButton": QPushButton, "QCheckBox": QCheckBox, "QSpinBox": QSpinBox, "QComboBox": QComboBox,
            "QProgressBar": QProgressBar}


def _properties(element) -> dict:
    values = {}
    for prop in element.findall("property"):
        value = next(iter(prop), None)
        values[prop.get("name")] = value.text if value is not None else None
    return values


def loadUI(path):
    """The module's .ui file as a Root of stand-in widgets (slicer.util.loadUI needs Qt)."""
    tree = ElementTree.parse(str(path))
    top = tree.getroot().find("widget")
    children = {}
    for element in top.iter("widget"):
        if element is top:
            continue
        name, cls, props = element.get("name"), element.get("class"), _properties(element)
        if cls == "QTableWidget":
            columns = [_properties(column).get("text") for column in element.findall("column")]
            children[name] = QTableWidget(name, props, columns)
        else:
            children[name] = _CLASSES.get(cls, Widget)(name, props)
    return Root(top.get("name"), children)


def childWidgetVariables(root):
    """An object with one attribute per named widget, as slicer.util.childWidgetVariables gives."""
    ui = type("", (), {})()
    for name, child in root.childWidgets.items():
        setattr(ui, name, child)
    return ui
