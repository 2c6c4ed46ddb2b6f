"""Side projects built on the library, apart from the application: masked-LM POUF
(:mod:`~jaxprompt.side.mlm`) and the toy world's CLIP pretraining
(:mod:`~jaxprompt.side.toyclip`)."""
