"""The project's own task samples (written for these tests; no benchmark data): a context and
candidate endings in the shapes of HellaSwag, Winogrande and the multiple-choice sets, in the
domains the reference model is trained on (Python code and its documentation's prose)."""

from __future__ import annotations

from apex_orch.evaluation.task_files import ChoiceTask, HellaSwagTask, WinograndeTask

HELLASWAG = [
    HellaSwagTask("Python: To read a file line by line, open it with a with statement and",
                  ("iterate over the file object.", "paint the walls blue.", "call the plumber at noon.",
                   "bake the bread for an hour."), 0),
    HellaSwagTask("Python: The function raises a ValueError when the argument",
                  ("sings a song in the rain.", "is not a valid integer.", "climbs the tallest tree.",
                   "orders a pizza online."), 1),
    HellaSwagTask("Documentation: The dictionary maps each key to a value, so a lookup",
                  ("walks to the store slowly.", "drinks a glass of water.", "returns the value stored for the key.",
                   "forgets its own name."), 2),
    HellaSwagTask("Python: To sort the list in place, the code calls",
                  ("the fire brigade.", "a taxi to the airport.", "its grandmother on Sunday.",
                   "the sort method of the list."), 3),
    HellaSwagTask("Documentation: A module is imported once, and later import statements",
                  ("reuse the module object that is already loaded.", "dance until the morning.",
                   "water the garden.", "jump over the fence."), 0),
    HellaSwagTask("Python: The loop stops early because the break statement",
                  ("eats an apple.", "exits the innermost enclosing loop.", "knits a warm scarf.",
                   "drives to the beach."), 1),
    HellaSwagTask("Documentation: When the class defines __len__, the built-in len",
                  ("goes for a swim.", "reads a bedtime story.", "calls that method to get the length.",
                   "plants a row of tulips."), 2),
    HellaSwagTask("Python: To join the path parts portably, the program uses",
                  ("a hammer and nails.", "a cup of coffee.", "a ladder and a rope.", "os.path.join from the os "
                                                                                      "module."), 3),
    HellaSwagTask("Documentation: The return value is None if the function",
                  ("reaches the end without a return statement.", "flies to the moon.", "paints a portrait.",
                   "sleeps in the hammock."), 0),
    HellaSwagTask("Python: The test fails because the assertion",
                  ("sails across the lake.", "compares two values that are not equal.", "sews a button on.",
                   "feeds the cat."), 1),
    HellaSwagTask("Documentation: A generator function returns an iterator that",
                  ("mows the lawn.", "rides a bicycle.", "yields the values one at a time.", "buys new shoes."), 2),
    HellaSwagTask("Python: The exception is caught by the except clause, and the handler",
                  ("picks the strawberries.", "climbs a mountain.", "cleans the windows.",
                   "logs the error and continues."), 3),
]

WINOGRANDE = [
    WinograndeTask("The list did not fit in the tuple because _ was too long.", ("the list", "the tuple"), 1),
    WinograndeTask("The function called the helper because _ needed the parsed value.",
                   ("the function", "the helper"), 1),
    WinograndeTask("The string was shorter than the buffer, so _ had room to spare.", ("the string", "the buffer"), 2),
    WinograndeTask("The parser rejected the file because _ was malformed.", ("the parser", "the file"), 2),
    WinograndeTask("The thread waited for the lock, because _ was held by another thread.",
                   ("the thread", "the lock"), 2),
    WinograndeTask("The module imported the package, so _ was loaded first.", ("the module", "the package"), 2),
    WinograndeTask("The test passed but the build failed, so _ needs a fix.", ("the test", "the build"), 2),
    WinograndeTask("The server answered the client quickly because _ was idle.", ("the server", "the client"), 1),
    WinograndeTask("The cache was faster than the disk, so reads used _.", ("the cache", "the disk"), 1),
    WinograndeTask("The class inherited from the base, so _ got its methods.", ("the class", "the base"), 1),
    # the option ends the sentence: too few tokens after it, so the tool scores from the shared prefix on
    WinograndeTask("The list x is empty and y is not, so the empty one is _.", ("x", "y"), 1),
    WinograndeTask("Of the names a and b, only b was defined, so the missing name is _.", ("a", "b"), 1),
]

CHOICES = [
    ChoiceTask("Which keyword defines a function in Python?", ("def", "func", "lambda function", "define"), 0),
    ChoiceTask("What does len return for an empty list?", ("None", "0", "an error", "1", "the list")
               , 1),
    ChoiceTask("Which statement leaves a loop at once?", ("continue", "pass", "break"), 2),
    ChoiceTask("What type is the result of 3 / 2 in Python 3?", ("int", "str", "list", "float"), 3),
    ChoiceTask("Which module joins file paths?", ("os.path", "math", "random", "string"), 0),
    ChoiceTask("What does the with statement manage?", ("a loop counter", "a context manager", "a class"), 1),
    ChoiceTask("Which method adds an item to the end of a list?", ("insert", "extend", "append", "add", "push"), 2),
    ChoiceTask("Which value is false in a boolean context?", ("1", "'a'", "[0]", "an empty list"), 3),
    ChoiceTask("What does import do with a module that is already loaded?",
               ("reuses it", "loads it again", "deletes it", "renames it"), 0),
    ChoiceTask("Which exception does int('x') raise?", ("KeyError", "ValueError", "IndexError"), 1),
    ChoiceTask("What does the yield keyword make of a function?",
               ("a class", "a module", "a generator", "a string"), 2),
    ChoiceTask("Which built-in gives the number of items?", ("sum", "max", "min", "len", "abs", "any"), 3),
]
