from tests.figures import summary


def pytest_terminal_summary(terminalreporter):
    summary(terminalreporter)
