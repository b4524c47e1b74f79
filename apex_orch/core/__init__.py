"""Infrastructure every stage shares; knows nothing about models or llama.cpp.

Takes: nothing from the other packages (it is the bottom of the import graph).
Gives: the error hierarchy and its exit codes (errors), the environment and cache paths read in
one place (settings), every input file opened one way and bounded (infiles), files that are whole
or absent (safefiles, outputs), content hashes and the
manifests that let reruns skip finished work (fingerprint, manifest), YAML with line numbers
(yamlio) and human-readable sizes and tables (text).
"""
