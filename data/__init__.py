"""The data: the built-in captioned shapes (renderer, vocabulary, captions and their claims) and one loader for
shapes, local image folders and hub datasets. It imports only core/; models may read the shapes vocabulary from it."""
