"""MOCK of Slicer's PythonQt ``qt`` module (slicer-core has no Qt): only what ProbSAMSlicer.py and
slicer.util's dialog helpers touch in the code paths CI drives. The widget's .ui is read by the stand-in
``loadUI`` (widgets.py); a test drives the timer by calling its slot while ``active``."""


class Qt:
    WaitCursor = 3


class QMessageBox:
    Ok, Cancel, Yes, No, Critical, Warning, Question, Information = 1024, 4194304, 16384, 65536, 3, 2, 4, 1


class QTimer:
    def __init__(self):
        self.interval, self.active, self.slots = 0, False, []

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, slot):
        self.slots.append((signal, slot))

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


class QSettings:
    """Application settings: one dict for the process (tests set ``QSettings.values``)."""

    values = {}

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value):
        self.values[key] = value


class QFileDialog:
    @staticmethod
    def getOpenFileName(*args):
        return ""


class QTableWidgetItem:
    def __init__(self, text=""):
        self.text = text
