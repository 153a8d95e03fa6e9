"""STAND-IN for Slicer's PythonQt ``qt`` module (a mock; Slicer cannot run in CI).

Only what ProbSAMSlicer.py touches at import time and in code paths the tests drive; the widget itself
is exercised in real Slicer (its .ui names are checked against the code by parsing the XML).
"""


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
