"""MOCK of ``slicer.i18n`` (it needs Qt's translator): tr returns the text untranslated."""


def tr(text):
    return text
