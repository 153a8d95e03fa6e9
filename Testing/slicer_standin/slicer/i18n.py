"""STAND-IN for ``slicer.i18n`` (a mock): tr returns the text untranslated."""


def tr(text):
    return text
