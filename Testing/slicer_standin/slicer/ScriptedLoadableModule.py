"""STAND-IN for ``slicer.ScriptedLoadableModule`` (a mock; Slicer cannot run in CI): the base classes."""

import unittest

import slicer


class _Parent:
    """What Slicer passes as ``parent`` to a module: an object with the metadata attributes."""

    def __init__(self):
        self.title, self.categories, self.dependencies, self.contributors = "", [], [], []
        self.helpText, self.acknowledgementText = "", ""


class ScriptedLoadableModule:
    def __init__(self, parent=None):
        self.parent = parent if parent is not None else _Parent()
        self.moduleName = type(self).__name__


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = type(self).__name__[:-len("Widget")]

    def setup(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__[:-len("Logic")]

    def getParameterNode(self):
        """One vtkMRMLScriptedModuleNode per module, as in Slicer (a singleton in the scene)."""
        name = self.moduleName
        node = slicer.mrmlScene.GetFirstNodeByName(name)
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", name)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=None):
        print(message)
