"""MOCK of Slicer's PythonQt ``qt`` module (slicer-core has no Qt): only what ProbSAMSlicer.py and
slicer.util's dialog helpers touch in the code paths CI drives. The widget runs in real Slicer only; its
.ui names are checked against the code by Testing/test_slicer_packaging.py."""


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


class QFileDialog:
    @staticmethod
    def getOpenFileName(*args):
        return ""


class QTableWidgetItem:
    def __init__(self, text=""):
        self.text = text
