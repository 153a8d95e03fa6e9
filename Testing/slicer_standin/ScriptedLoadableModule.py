"""MOCK of ``slicer.ScriptedLoadableModule`` (its base classes need Qt): the module, widget, logic and
test bases, with Slicer's behaviour where CI relies on it. The logic's parameter node is a REAL
vtkMRMLScriptedModuleNode, a singleton per module in the real scene, as Slicer makes it."""

import logging
import unittest

import slicer


class _Parent:
    """What Slicer passes as ``parent`` to a module: an object with the metadata attributes."""

    def __init__(self):
        self.title, self.categories, self.dependencies, self.contributors = "", [], [], []
        self.helpText, self.acknowledgementText = "", ""
        self.isEntered = False


class ScriptedLoadableModule:
    def __init__(self, parent=None):
        self.parent = parent if parent is not None else _Parent()
        self.moduleName = type(self).__name__


class _Layout:
    """The widget's layout: remembers what was added."""

    def __init__(self):
        self.widgets = []

    def addWidget(self, widget):
        self.widgets.append(widget)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent if parent is not None else _Parent()
        self.moduleName = type(self).__name__[:-len("Widget")]
        self.layout = _Layout()

    def setup(self):
        pass

    def resourcePath(self, filename):
        """Resources/<filename> next to the module's .py file, as Slicer resolves it."""
        import os
        import sys

        module = sys.modules[type(self).__module__]
        return os.path.join(os.path.dirname(os.path.abspath(module.__file__)), "Resources", filename)


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__[:-len("Logic")]

    def getParameterNode(self):
        """The module's singleton vtkMRMLScriptedModuleNode, created on first use (as in Slicer)."""
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetModuleName(self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=None):
        logging.info(message)
