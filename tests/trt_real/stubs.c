/* Stand-ins for the nine C entry points that TensorRT's Python extension module links
 * (libnvinfer, libnvinfer_plugin, libnvonnxparser). Compiled three times, one library each
 * (-DNVINFER, -DPLUGIN, -DPARSER), with the real SONAMEs, so that the real bindings import on a
 * machine without TensorRT or a GPU. Every factory returns NULL: the real Builder, Runtime and
 * OnnxParser constructors then fail, which is why tests/trt_real/strict.py stands in for them. */
#include <stddef.h>

#ifdef NVINFER
void *createInferBuilder_INTERNAL(void *logger, int version) { (void)logger; (void)version; return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int version) { (void)logger; (void)version; return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { (void)engine; (void)logger; (void)version; return NULL; }
void *getPluginRegistry(void) { return NULL; }
void *getBuilderPluginRegistry(int capability) { (void)capability; return NULL; }
#endif

#ifdef PLUGIN
int initLibNvInferPlugins(void *logger, const char *ns) { (void)logger; (void)ns; return 0; }
#endif

#ifdef PARSER
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { (void)network; (void)logger; (void)version; return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { (void)refitter; (void)logger; (void)version; return NULL; }
int getNvOnnxParserVersion(void) { return 0; }
#endif
